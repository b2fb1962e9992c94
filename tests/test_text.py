import json
import sys
import zlib

import pytest
import torch
from tiny_t5 import write_tiny_t5

from dit_video.config import ConfigError, from_dict
from dit_video.text import (BOS, EOS, PAD, ByteTextEncoder, T5TextEncoder, TextConfig, WordTextEncoder,
                            build_text_encoder, drop_captions)

CAPTIONS = ["a cat", "", "a dog runs in the park at night", "ünïcödé 🎬"]


def test_byte_encoder_shapes_and_masks():
    encoder = ByteTextEncoder(max_length=64, dim=32, depth=2, heads=4)
    tokens, mask = encoder(CAPTIONS)
    lengths = [len(c.encode("utf-8")) + 2 for c in CAPTIONS]  # + BOS, EOS
    assert tokens.shape == (4, max(lengths), 32) and tokens.dtype == torch.float32
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[i < n for i in range(max(lengths))] for n in lengths]
    assert torch.isfinite(tokens).all()


def test_byte_tokens_unicode_and_truncation():
    encoder = ByteTextEncoder(max_length=6, dim=16, depth=1, heads=2)
    ids, mask = encoder.tokenize(["ü🎬", "abcdefghij", "ab"])
    # ü is 2 bytes, 🎬 is 4: the cut at max_length - 2 = 4 bytes splits the emoji, which bytes allow
    assert ids.tolist() == [[BOS, 0xC3, 0xBC, 0xF0, 0x9F, EOS],
                            [BOS, *b"abcd", EOS],
                            [BOS, *b"ab", EOS, PAD, PAD]]
    assert mask.tolist() == [[True] * 6, [True] * 6, [True] * 4 + [False] * 2]
    assert encoder(["ü🎬" * 10])[0].shape == (1, 6, 16)
    assert encoder.tokenize(["ab", "c"])[0].shape == (2, 4)  # padded to the longest, not to max_length


def test_byte_encoder_is_independent_of_the_batch():
    encoder = ByteTextEncoder(max_length=64, dim=32, depth=2, heads=4).double()
    tokens, mask = encoder(CAPTIONS)
    for i, caption in enumerate(CAPTIONS):
        alone, alone_mask = encoder([caption])
        n = int(alone_mask.sum())
        assert int(mask[i].sum()) == n
        torch.testing.assert_close(tokens[i, :n], alone[0], rtol=0, atol=1e-12)
    assert torch.equal(encoder(CAPTIONS)[0], tokens)  # deterministic


def test_byte_encoder_trains():
    encoder = build_text_encoder(TextConfig(dim=32, depth=2, heads=4))
    assert isinstance(encoder, ByteTextEncoder) and encoder.trainable and encoder.dim == 32
    tokens, mask = encoder(CAPTIONS)
    (tokens * mask[..., None]).square().mean().backward()
    for name, p in encoder.named_parameters():
        assert p.requires_grad and p.grad is not None, name
    assert encoder.embed.weight.grad[ord("a")].abs().sum() > 0
    assert encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_word_tokens_are_hashed_words():
    encoder = WordTextEncoder(max_length=4, dim=16, vocab=1000)
    ids, mask = encoder.tokenize(["A red circle, moving RIGHT!", "", "ünï-cödé words_here 42 and more"])
    bucket = lambda word: zlib.crc32(word.encode()) % 1000  # noqa: E731
    assert ids[0].tolist() == [bucket(w) for w in ("a", "red", "circle", "moving")]  # cut at max_length words
    assert mask.tolist() == [[True] * 4, [False] * 4, [True] * 4]  # a caption without words: all padding
    assert ids[1].tolist() == [1000] * 4  # the padding row
    assert ids[2].tolist() == [bucket(w) for w in ("ünï", "cödé", "words", "here")]  # letters of any script
    assert encoder.tokenize([""])[0].shape == (1, 1)  # one slot at least, for the null text


def test_the_synthetic_words_get_buckets_of_their_own():
    from dit_video.data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES

    words = {w for name in [*SHAPES, *COLORS, *DIRECTIONS, *BACKGROUNDS, "a moving on background"]
             for w in name.split()}
    encoder = build_text_encoder(TextConfig(encoder="words", dim=32, depth=0))
    assert len({encoder.word_ids(w)[0] for w in words}) == len(words)


@pytest.mark.parametrize("depth", [0, 2])
def test_word_encoder_trains_and_is_independent_of_the_batch(depth):
    encoder = build_text_encoder(TextConfig(encoder="words", dim=32, depth=depth, heads=4))
    assert isinstance(encoder, WordTextEncoder) and encoder.trainable and len(encoder.blocks) == depth
    encoder = encoder.double()
    tokens, mask = encoder(CAPTIONS)
    assert tokens.shape == (4, 8, 32) and mask.sum(1).tolist() == [2, 0, 8, 1]  # the emoji is no word
    for i, caption in enumerate(CAPTIONS):
        alone, alone_mask = encoder([caption])
        n = int(alone_mask.sum())
        torch.testing.assert_close(tokens[i, :n], alone[0, :n], rtol=0, atol=1e-12)
    # unit-scale word embeddings: distinct words are far apart from the first step
    a, b = encoder(["moving right", "moving left"])[0][:, 1]
    assert (a - b).norm() > 0.5 * a.norm()
    (tokens * mask[..., None]).square().mean().backward()
    assert encoder.embed.weight.grad[encoder.word_ids("dog")[0]].abs().sum() > 0


def test_drop_captions_rate_and_reproducibility():
    captions = ["x"] * 20_000
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert dropped.dtype == torch.bool and dropped.shape == (20_000,)
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # 4.7 standard deviations
    again = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, drop_captions(captions, 0.1, torch.Generator().manual_seed(1)))
    assert not drop_captions(captions, 0.0, torch.Generator()).any()
    assert drop_captions(captions, 1.0, torch.Generator()).all()
    with pytest.raises(ValueError, match="caption dropout"):
        drop_captions(captions, 1.5, torch.Generator())


def test_config_errors():
    with pytest.raises(ValueError, match="needs path"):
        TextConfig(encoder="t5")
    with pytest.raises(ValueError, match="path applies to encoder 't5' only"):
        TextConfig(path="checkpoints/t5")
    with pytest.raises(ValueError, match="dim, heads: settings of the trained encoders, not of 't5'"):
        TextConfig(encoder="t5", path="checkpoints/t5", dim=64, heads=8)
    with pytest.raises(ValueError, match="vocab: a setting of encoder 'words'"):
        TextConfig(vocab=100)
    with pytest.raises(ValueError, match="the words encoder has no checkpoint"):
        TextConfig(encoder="words", path="x")
    with pytest.raises(ValueError, match="must split into 3 heads"):
        TextConfig(dim=64, heads=3)
    with pytest.raises(ConfigError, match="^config: caption_dropout: expected a number >= 0 and <= 1, got 1.5$"):
        from_dict(TextConfig, {"caption_dropout": 1.5})
    with pytest.raises(ConfigError, match="^config: encoder 't5' needs path"):
        from_dict(TextConfig, {"encoder": "t5"})
    with pytest.raises(ValueError, match="non-empty list of captions"):
        ByteTextEncoder()("a caption, not a list")


# --- T5, on a real tiny checkpoint written offline -------------------------------------------------------


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    return write_tiny_t5(tmp_path_factory.mktemp("t5"), CAPTIONS)


def test_t5_encoder_matches_the_model_and_is_frozen(t5_dir):
    from transformers import T5EncoderModel

    encoder = build_text_encoder(TextConfig(encoder="t5", path=str(t5_dir)))
    assert isinstance(encoder, T5TextEncoder) and encoder.dim == 32 and not encoder.trainable
    assert all(not p.requires_grad for p in encoder.parameters())
    assert not encoder.train().model.training  # no dropout even inside a module in train mode

    tokens, mask = encoder(CAPTIONS)
    # one id per word (and per emoji), then </s>
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == [3, 1, 9, 3]
    assert tokens.shape == (4, 9, 32) and tokens.grad_fn is None
    ids = encoder.tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    assert torch.equal(mask, ids.attention_mask.bool())
    with torch.no_grad():
        direct = T5EncoderModel.from_pretrained(t5_dir).eval()(**ids).last_hidden_state
    torch.testing.assert_close(tokens, direct, rtol=0, atol=0)
    for i, caption in enumerate(CAPTIONS):  # padding is masked out: each caption as if alone
        n = int(mask[i].sum())
        torch.testing.assert_close(tokens[i, :n], encoder([caption])[0][0], rtol=1e-5, atol=1e-6)


def test_t5_truncation_keeps_eos(t5_dir):
    encoder = T5TextEncoder(str(t5_dir), max_length=4)
    tokens, mask = encoder(["a dog runs in the park at night", "a cat"])
    assert tokens.shape == (2, 4, 32) and mask.sum(1).tolist() == [4, 3]
    ids = encoder.tokenizer(["a dog runs in the park at night"], truncation=True, max_length=4).input_ids[0]
    assert len(ids) == 4 and ids[-1] == encoder.tokenizer.eos_token_id


def test_t5_errors(t5_dir, tmp_path, monkeypatch):
    def partial_copy(name: str, *files: str):
        path = tmp_path / name
        path.mkdir()
        for file in files:
            (path / file).write_bytes((t5_dir / file).read_bytes())
        return str(path)

    with pytest.raises(ValueError, match=r"^text.path: \S+ holds no T5 checkpoint \(config.json missing\)$"):
        T5TextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"holds no tokenizer \(tokenizer.json or spiece.model missing\)$"):
        T5TextEncoder(partial_copy("no_tokenizer", "config.json", "model.safetensors"))
    with pytest.raises(ValueError, match="holds no usable T5 checkpoint: .*model.safetensors"):
        T5TextEncoder(partial_copy("no_weights", "config.json", "tokenizer.json", "tokenizer_config.json"))
    deeper = partial_copy("deeper", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    config = json.loads((t5_dir / "config.json").read_text())
    (tmp_path / "deeper" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match=r"lacks 8 weights of a T5 encoder, e.g. encoder.block.2"):
        T5TextEncoder(deeper)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ValueError, match=r"needs transformers: pip install 'dit-video\[t5\]'"):
        T5TextEncoder(str(t5_dir))
