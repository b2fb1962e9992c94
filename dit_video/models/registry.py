"""One registry: `build_backbone(cfg)` for every backbone, from a config's `name`; and
`compile_blocks(model)`, which compiles a transformer's blocks."""

from __future__ import annotations

import os
from dataclasses import is_dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, from_dict, read_yaml
from .dit import Block, DiT, DiTConfig
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
    config = from_dict(config_cls, cfg, source=source)
    try:
        return model_cls(config)
    except ValueError as e:  # sizes that fit each key but not each other (channels and norm groups)
        raise ConfigError(f"{source}: {e}") from None


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each block of a transformer backbone in place (parameter names stay as they
    are) and return how many. The blocks share code and shapes, so they compile once per input
    shape, and the per-call preparation (positions, masks, conditioning) stays eager. Inside a
    block the elementwise work between the matrix products (norms, modulation, gates, residuals)
    fuses into few kernels: on a GPU, where a step of a small batch is mostly such work, that is
    the main saving. The first call at each shape (and grad mode) compiles, in seconds to
    minutes; the blocks share one cache of graphs, whatever model holds them.

    The U-Net is refused: its blocks differ in channels and resolution, so each would compile
    anew (7 shapes in the tiny U-Net alone, times every bucket)."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"compile: only the transformer backbones (dit, dit3d) compile by block, not "
                         f"{type(model).__name__}")
    # dynamo's default of 8 graphs per code object is soon reached (each bucket, a batch with
    # images, sampling previews, a distillation teacher under no_grad), and past it dynamo runs
    # the blocks eagerly with one warning: a silent loss of the speedup
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in blocks:
        # static shapes: a graph per bucket shape. Automatic dynamic shapes (after a second shape)
        # were seen to fail under two processes (an input's stride asserted from another shape).
        block.compile(dynamic=False)
    return len(blocks)


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
