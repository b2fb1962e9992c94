"""A small untrained pipeline folder for tests of generation: the shipped layout (pipeline.yaml,
vae/, base/, tsr/, ssr/) with random weights, made in a second or two."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from dit_video.diffusion import CascadeConfig
from dit_video.models.pretrained import DiffusionModel, DiffusionModelConfig
from dit_video.text import TextConfig
from vae import VAEConfig, VideoVAE

VAE = VAEConfig(latent_channels=4, channels=[8, 8], spatial_factor=2, temporal_factor=2, blocks_per_level=1,
                attention=False, norm_groups=4)


def randomized(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere, so that adaLN-Zero's zero outputs do not hide anything."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return module


def write_pipeline(root: Path, frames: int = 9, size: int = 16, stages=("base", "tsr", "ssr")) -> Path:
    """Output `frames` x `size` x `size` pixels; TSR doubles the frame rate, SSR the size."""
    root.mkdir(parents=True, exist_ok=True)
    vae = randomized(VideoVAE(VAE), 0)
    vae.save_pretrained(root / "vae")
    entries = []
    for i, stage in enumerate(stages):
        cascade = None if stage == "base" else CascadeConfig(**({"temporal": 2} if stage == "tsr" else {"spatial": 2}))
        backbone = {"name": "dit", "size": "tiny", "in_channels": 4, "text_dim": 16, "patch": [1, 1, 1],
                    "cond_channels": 0 if cascade is None else 4}
        cfg = DiffusionModelConfig(stage, backbone, TextConfig(dim=16, depth=1, heads=2, max_length=32),
                                   cascade=cascade)
        model = randomized(DiffusionModel(cfg), i + 1)
        model.save_pretrained(root / stage, model.trained_state())
        entries.append({"model": stage, **({} if cascade is None else {"aug_logsnr": 3.0})})
    config = {"vae": "vae", "stages": entries, "frames": frames, "height": size, "width": size, "fps": 8,
              "sampler": {"sampler": "ddim", "steps": 3}, "guidance": {"weight": 1.0}}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root
