"""One registry: `build_backbone(cfg)` for every backbone, from a config's `name`."""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, from_dict, read_yaml
from .dit import DiT, DiTConfig
from .unet3d import UNet3D, UNet3DConfig

# name -> (config class, model class)
BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {"dit": (DiTConfig, DiT), "dit3d": (DiTConfig, DiT),
                                                      "unet3d": (UNet3DConfig, UNet3D)}


def build_backbone(cfg: dict | str | os.PathLike | object) -> nn.Module:
    """A backbone from a config dataclass, a dict, or a YAML path; its `name` picks the class."""
    if is_dataclass(cfg):
        return BACKBONES[cfg.name][1](cfg)
    source = "backbone config"
    if isinstance(cfg, (str, Path)):
        source, cfg = str(cfg), read_yaml(cfg)
    name = cfg.get("name")
    if name not in BACKBONES:
        raise ConfigError(f"{source}: name: expected one of {', '.join(map(repr, BACKBONES))}, got {name!r}")
    config_cls, model_cls = BACKBONES[name]
    return model_cls(from_dict(config_cls, cfg, source=source))


# The key that sets each backbone's width, which `match_parameters` tunes.
WIDTH_KEYS = {"dit": "width", "dit3d": "width", "unet3d": "channels"}


def backbone_parameters(cfg: dict) -> int:
    """The parameter count of the backbone `cfg` describes, without allocating its weights."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_backbone(cfg).parameters())


def match_parameters(cfg: dict, target: int, step: int = 8, limit: int = 16384) -> dict:
    """`cfg` with its width (WIDTH_KEYS) set to the multiple of `step` whose parameter count is
    closest to `target`, for A/B comparisons at one parameter budget. Widths the backbone rejects
    (heads or norm groups that do not divide them) are passed over."""
    key = WIDTH_KEYS[cfg["name"]]
    best: tuple[int, dict] | None = None
    for width in range(step, limit + 1, step):  # the count grows with the width: stop once past
        candidate = {**cfg, key: width}
        try:
            gap = backbone_parameters(candidate) - target
        except (ValueError, ConfigError):
            continue
        if best is None or abs(gap) < best[0]:
            best = (abs(gap), candidate)
        if gap >= 0:
            break
    if best is None:
        raise ConfigError(f"backbone {cfg['name']}: no {key} up to {limit} builds")
    return best[1]
