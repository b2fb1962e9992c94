"""One registry: `build_backbone(cfg)` for every backbone, from a config's `name`."""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path

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
