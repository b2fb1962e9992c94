"""Sample videos during training, from the EMA weights, to watch a base model learn.

Rank 0 keeps its own copy of the model (made before DeepSpeed partitions the original), loads
the EMA weights into it, samples one clip per prompt and writes them side by side as
`<out_dir>/samples/step_NNNNNNNN.mp4`. No collective calls: the other processes go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import param
from ..data.video import write_video
from ..diffusion import DiffusionConfig, GuidanceConfig, SamplerConfig, guided_denoiser, model_denoiser, sample


@dataclass
class PreviewConfig:
    every: int = param(0, ge=0)  # steps between sample videos; 0: none
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right on a gray background"])
    frames: int = param(9, ge=1)  # pixels, as a bucket: 1 + f*k frames
    height: int = param(32, ge=8)
    width: int = param(32, ge=8)
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=25))
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(weight=2.0))

    def __post_init__(self):
        if self.every and not self.prompts:
            raise ValueError("preview.prompts: give at least one prompt")


@torch.no_grad()
def write_preview(path: Path, model: nn.Module, ema_state: dict[str, torch.Tensor], vae, text_encoder: nn.Module,
                  cfg: PreviewConfig, diffusion: DiffusionConfig, device: torch.device) -> Path:
    """`model` is the DiffusionObjective copy; `text_encoder` is its own (bytes) or the frozen T5."""
    model.load_state_dict(ema_state, strict=False)  # the EMA holds the trained weights; buffers stay
    model.to(device).eval()
    text, mask = text_encoder(cfg.prompts)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    shape = vae.latent_shape((len(cfg.prompts), 3, cfg.frames, cfg.height, cfg.width))
    z = torch.randn(shape, generator=generator, device=device)
    denoiser = guided_denoiser(model_denoiser(model.backbone, diffusion.prediction),
                               {"text": text, "text_mask": mask}, {"text": text, "text_mask": torch.zeros_like(mask)},
                               cfg.guidance, steps=cfg.sampler.steps, schedule=diffusion.schedule)
    latents = sample(denoiser, z, schedule=diffusion.schedule, generator=generator, **cfg.sampler.kwargs())
    video = vae.decode(latents)  # [B, 3, T, H, W]
    return write_video(path, torch.cat(list(video), dim=-1))  # the prompts side by side
