"""A trained diffusion stage on disk and in memory: what `train.py` exports and what the
pipeline, the distillation teacher and the evaluation load.

A model directory holds `config.yaml` (a `DiffusionModelConfig`: everything needed to rebuild
the network, with the backbone written out in full, so the folder does not depend on the
YAML files it was trained from), `model.safetensors` and `ema.safetensors` (the weights of
the backbone and of the text encoder trained with it), and `train_config.yaml`, the record of
the run that made it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError, param, read_yaml, from_dict, save_config
from ..diffusion import CascadeConfig, DiffusionConfig, model_denoiser
from ..diffusion.parameterization import Denoiser
from ..text import TextConfig, build_text_encoder
from .registry import build_backbone

WEIGHTS = {"ema": "ema.safetensors", "model": "model.safetensors"}


@dataclass
class DiffusionModelConfig:
    stage: Literal["base", "tsr", "ssr"]
    backbone: dict[str, Any]  # the backbone's whole config (build_backbone)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cascade: CascadeConfig | None = None  # tsr, ssr: the factors and training augmentation range
    steps: int | None = param(None, ge=1)  # a distilled model: the sampler steps it was distilled for

    def __post_init__(self):
        if (self.stage == "base") != (self.cascade is None):
            raise ValueError("cascade: set for the tsr and ssr stages, and only for them")


class DiffusionModel(nn.Module):
    """The backbone and the text encoder of one stage, with its config. The byte-level text
    encoder is trained with the backbone (its weights are in the folder); a T5 is read from
    its own local path."""

    def __init__(self, cfg: DiffusionModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.text_encoder = build_text_encoder(cfg.text)

    @property
    def guidance_input(self) -> bool:
        """Whether the backbone takes the guidance weight as an input (guidance distilled in)."""
        return bool(self.config.backbone.get("guidance_input", False))

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The weights a model folder stores: the backbone's and a trained text encoder's."""
        keep = ("backbone.", "text_encoder.") if self.text_encoder.trainable else ("backbone.",)
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}

    def save_pretrained(self, directory: str | os.PathLike, ema_state: dict[str, torch.Tensor] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_config(self.config, directory / "config.yaml")
        save_file(_plain(self.trained_state()), directory / WEIGHTS["model"])
        if ema_state is not None:
            save_file(_plain(ema_state), directory / WEIGHTS["ema"])
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, weights: Literal["ema", "model"] = "ema",
                        device: torch.device | str = "cpu") -> "DiffusionModel":
        """Load a model folder; `weights` picks the EMA (the default, what sampling wants) or the
        raw trained weights. A missing or damaged folder raises ConfigError in one line."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"{directory}: no such model directory")
        config = directory / "config.yaml"
        cfg = from_dict(DiffusionModelConfig, read_yaml(config), source=str(config))
        model = cls(cfg)
        path = directory / WEIGHTS[weights]
        try:
            state = load_file(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: missing") from None
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
        expected = model.trained_state()
        missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        wrong = [k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape]
        if missing or unexpected or wrong:
            detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                      else f"shape of {wrong[:3]}")
            raise ConfigError(f"{path}: does not fit {directory / 'config.yaml'} ({detail})")
        model.load_state_dict(state, strict=False)
        return model.to(device).eval().requires_grad_(False)

    def denoiser(self) -> Denoiser:
        """D(z, logsnr, **conditioning) -> x_hat of the backbone, in the backbone's dtype."""
        return model_denoiser(self.backbone, self.config.diffusion.prediction)

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, L, D], mask [B, L]) on the model's device; the null text is an all-False mask."""
        text, mask = self.text_encoder(prompts)
        device = next(self.backbone.parameters()).device
        return text.to(device), mask.to(device)


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
