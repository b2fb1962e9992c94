"""Text encoders: a list of captions in, `(tokens [B, L, D] float, mask [B, L] bool)` out.

Three kinds behind `build_text_encoder(TextConfig)`, each with `.dim` (D, the backbone's `text_dim`)
and `.trainable`:

- `bytes`: a small transformer over UTF-8 bytes, trained jointly with the diffusion model. No
  vocabulary, no download: the encoder of the tests.
- `words`: a learned embedding per word (lowercased runs of letters and digits, each hashed into
  one of `vocab` buckets, so there is no vocabulary file either), plus learned positions and
  `depth` transformer blocks (0: none), trained jointly. A word is then one token whose features
  say which word it is from the first step, where the byte encoder must first learn to compose
  bytes into words; words that set the layout ("moving right") are learned only through that
  (see the tiny pipeline's README).
- `t5`: a frozen T5 encoder read from a local directory with `transformers` (`pip install
  'dit-video[t5]'`), as in Imagen (T5-XXL) and Open-Sora. Its weights never change, so the trainer
  leaves them out of the optimizer and out of training checkpoints (`trainable` is False): they are
  read again from `text.path`.

Batches are padded to their longest caption (at most `max_length` tokens, BOS/EOS included); `mask`
is True on real tokens. Padding is masked out of every attention, so a caption's tokens do not
depend on the captions it is batched with.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .config import param

__all__ = ["TextConfig", "ByteTextEncoder", "WordTextEncoder", "T5TextEncoder", "build_text_encoder", "drop_captions"]

BOS, EOS, PAD = 256, 257, 258  # byte ids are 0..255
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")  # a fast tokenizer, or T5's sentencepiece model


@dataclass
class TextConfig:
    """Which text encoder, and the caption dropout that trains the null text for guidance."""

    encoder: Literal["bytes", "words", "t5"] = "bytes"
    path: str | None = None  # t5: local directory of the checkpoint (config.json, weights, tokenizer)
    max_length: int = param(64, ge=2)  # tokens per caption (bytes: BOS/EOS included); longer captions are cut
    dim: int = param(128, ge=8)  # bytes, words: width, depth (0: embeddings only) and heads of the transformer
    depth: int = param(2, ge=0)
    heads: int = param(4, ge=1)
    vocab: int = param(8192, ge=2)  # words: hash buckets
    caption_dropout: float = param(0.1, ge=0, le=1)  # share of training captions replaced by the null text

    def __post_init__(self):
        if self.encoder == "t5":
            if self.path is None:
                raise ValueError("encoder 't5' needs path: the local directory of a T5 checkpoint")
            changed = [f.name for f in fields(self) if f.name in ("dim", "depth", "heads", "vocab")
                       and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"{', '.join(changed)}: settings of the trained encoders, not of 't5'")
        else:
            if self.path is not None:
                raise ValueError(f"path applies to encoder 't5' only; the {self.encoder} encoder has no checkpoint")
            if self.dim % self.heads:
                raise ValueError(f"dim {self.dim} must split into {self.heads} heads")
            if self.encoder == "bytes" and self.vocab != 8192:
                raise ValueError("vocab: a setting of encoder 'words' (bytes need none)")


def _check_captions(captions: list[str]) -> None:
    if isinstance(captions, str) or not captions:
        raise ValueError(f"expected a non-empty list of captions, got {captions!r}")


def _one_line(error: Exception) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


class ByteTextEncoder(nn.Module):
    """UTF-8 bytes with BOS/EOS, a learned embedding and learned positions, pre-norm transformer
    blocks with padding masked out, and a final LayerNorm. Trained with the diffusion model."""

    trainable = True

    def __init__(self, max_length: int = 64, dim: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.max_length, self.dim = max_length, dim
        self.embed = nn.Embedding(PAD + 1, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L] long, mask [B, L] bool): BOS, the first max_length - 2 bytes, EOS, padding.
        A cut may split a multi-byte character; bytes need no valid text."""
        _check_captions(captions)
        rows = [[BOS, *caption.encode("utf-8")[: self.max_length - 2], EOS] for caption in captions]
        ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != PAD

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = (t.to(self.pos.device) for t in self.tokenize(captions))
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, attn_mask=mask[:, None, None, :])
        return self.norm(x), mask


class WordTextEncoder(nn.Module):
    """Words (lowercased runs of letters and digits), each hashed by CRC-32 into one of `vocab`
    buckets with a learned embedding, plus learned positions, `depth` pre-norm transformer blocks
    with padding masked out, and a final LayerNorm. Trained with the diffusion model.

    The embeddings start at unit scale (the positions near zero), so that from the first step each
    token says which word it is: the conditioning then reads a caption's words additively, which is
    what lets a small model learn words that set the layout (see the module docstring)."""

    trainable = True
    WORD = re.compile(r"[^\W_]+")  # letters and digits, any script

    def __init__(self, max_length: int = 64, dim: int = 128, depth: int = 0, heads: int = 4, vocab: int = 8192):
        super().__init__()
        self.max_length, self.dim, self.vocab = max_length, dim, vocab
        self.embed = nn.Embedding(vocab + 1, dim)  # the last row is padding (masked everywhere)
        self.pos = nn.Parameter(torch.zeros(1, max_length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def word_ids(self, caption: str) -> list[int]:
        """The bucket of each word of `caption`, the first max_length of them."""
        words = self.WORD.findall(caption.lower())[: self.max_length]
        return [zlib.crc32(word.encode("utf-8")) % self.vocab for word in words]

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L] long, mask [B, L] bool), L >= 1: a caption without words is all padding
        (the backbone's null text takes its place, as for a dropped caption)."""
        _check_captions(captions)
        rows = [self.word_ids(caption) for caption in captions]
        ids = torch.full((len(rows), max(1, *map(len, rows))), self.vocab, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.vocab

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = (t.to(self.pos.device) for t in self.tokenize(captions))
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        for block in self.blocks:
            x = block(x, attn_mask=mask[:, None, None, :])
        return self.norm(x), mask


class T5TextEncoder(nn.Module):
    """A frozen T5 encoder from a local directory: the last hidden state and the attention mask.

    It stays in eval mode (no dropout) even inside a module switched to `train()`, and runs without
    gradients. `trainable` is False: the trainer gives its parameters to no optimizer and writes none
    of them to checkpoints (it keeps the encoder outside the module it trains and saves), since they
    are read again from the same directory.
    """

    trainable = False

    def __init__(self, path: str, max_length: int = 64):
        super().__init__()
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise ValueError("text.encoder 't5' needs transformers: pip install 'dit-video[t5]'") from None
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"text.path: {path} holds no T5 checkpoint (config.json missing)")
        # Without these, transformers builds an empty tokenizer from config.json and says nothing.
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            raise ValueError(f"text.path: {path} holds no tokenizer ({' or '.join(TOKENIZER_FILES)} missing)")
        try:
            self.model, info = T5EncoderModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"text.path: {path} holds no usable T5 checkpoint: {_one_line(e)}") from None
        if info["missing_keys"]:  # transformers would leave them randomly initialized
            missing = sorted(info["missing_keys"])
            raise ValueError(f"text.path: {path} lacks {len(missing)} weights of a T5 encoder, e.g. {missing[0]}")
        self.model.eval().requires_grad_(False)
        self.max_length, self.dim = max_length, self.model.config.d_model

    def train(self, mode: bool = True) -> T5TextEncoder:
        super().train(mode)
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _check_captions(captions)
        batch = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.model.device)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        return out.last_hidden_state, batch.attention_mask.bool()


def build_text_encoder(cfg: TextConfig) -> ByteTextEncoder | WordTextEncoder | T5TextEncoder:
    if cfg.encoder == "t5":
        return T5TextEncoder(cfg.path, cfg.max_length)
    if cfg.encoder == "words":
        return WordTextEncoder(cfg.max_length, cfg.dim, cfg.depth, cfg.heads, cfg.vocab)
    return ByteTextEncoder(cfg.max_length, cfg.dim, cfg.depth, cfg.heads)


def drop_captions(captions: list[str], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool [B] mask, True where a caption is dropped (each with probability p), for
    classifier-free guidance training: the trainer gives those samples the null text."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {p}")
    device = generator.device if generator is not None else None
    return torch.rand(len(captions), generator=generator, device=device) < p
