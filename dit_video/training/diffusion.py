"""What a diffusion stage (base, tsr, ssr) needs around the training loop: the backbone's config
as the run dictates it, the checks of the buckets, the loader, the engine's inputs from a batch
(frozen VAE and text encoder, cascade conditioning) and the export for `from_pretrained`."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from vae import VideoVAE

from ..cli import UsageError
from ..config import ConfigError, read_yaml, save_config
from ..data import BucketConfig, BucketSampler, Loader, MediaDataset, read_manifest
from ..data.latent_cache import LatentDataset
from ..diffusion import augment_condition, downsample_video, sample_augmentation_logsnr, upsample_latent
from ..files import atomic_dir
from ..text import drop_captions
from .config import DiffusionTrainConfig
from .ema import EMA


def backbone_config(cfg: DiffusionTrainConfig, vae: VideoVAE, text_dim: int) -> dict:
    """The backbone's config with the channels the run dictates filled in (and checked if given)."""
    source = cfg.backbone if isinstance(cfg.backbone, str) else "backbone"
    backbone = dict(read_yaml(cfg.backbone) if isinstance(cfg.backbone, str) else cfg.backbone)
    implied = {"in_channels": vae.latent_channels, "text_dim": text_dim,
               "cond_channels": vae.latent_channels if cfg.cascade else 0}
    for key, value in implied.items():
        if backbone.setdefault(key, value) != value:
            raise ConfigError(f"{source}: {key}: this run needs {value}, got {backbone[key]}")
    return backbone


def check_buckets(cfg: DiffusionTrainConfig, vae: VideoVAE, patch: tuple[int, int, int]) -> None:
    """Every bucket must map to whole latent patches (frames 1 + f*k for a causal VAE)."""
    f, s = vae.temporal_factor, vae.spatial_factor
    preview = [BucketConfig(cfg.preview.frames, cfg.preview.height, cfg.preview.width, 1)] if cfg.preview.every else []
    for key, buckets in (("data.buckets", cfg.data.buckets), ("data.image_buckets", cfg.data.image_buckets),
                         ("preview", preview)):
        for i, b in enumerate(buckets):
            frames_ok = (b.frames - 1) % f == 0 and ((b.frames - 1) // f + 1) % patch[0] == 0
            if cfg.cascade and cfg.stage == "tsr" and b.frames > 1:
                frames_ok = frames_ok and (b.frames - 1) % (f * cfg.cascade.temporal) == 0
            size_ok = all(x % (s * p * (cfg.cascade.spatial if cfg.cascade else 1)) == 0
                          for x, p in ((b.height, patch[1]), (b.width, patch[2])))
            if not (frames_ok and size_ok):
                raise ConfigError(f"{key}[{i}]: {b.frames}x{b.height}x{b.width} does not fit the VAE "
                                  f"({f}x{s}x{s}), the patch {patch} and the cascade factors: frames must be "
                                  f"1 + {f}*k, height and width multiples of {s} x patch x spatial factor")


def make_loader(cfg: DiffusionTrainConfig, rank: int, world: int) -> Loader:
    data = cfg.data
    try:
        if data.latents:
            videos = LatentDataset(data.latents)
            videos.check_vae(cfg.vae)
        else:
            videos = MediaDataset(read_manifest(data.videos), "video", fps=data.fps, stride=data.stride) \
                if data.videos else None
        images = MediaDataset(read_manifest(data.images), "image") if data.images else None
        sampler = BucketSampler(len(videos) if videos else 0, len(images) if images else 0, data.buckets,
                                data.image_buckets, data.image_ratio, seed=cfg.train.seed, rank=rank, world=world)
    except ValueError as e:  # a bad manifest or bucket set: the user's input
        raise UsageError(f"data: {e}") from None
    return Loader(videos, images, sampler, num_workers=data.num_workers)


class Inputs:
    """Turns a loader batch into the engine's inputs: VAE latents, text for a frozen encoder, and
    for cascade stages the augmented low-resolution latent and its level. All frozen, no grad."""

    def __init__(self, cfg: DiffusionTrainConfig, vae: VideoVAE, frozen_text: nn.Module | None,
                 device: torch.device, generator: torch.Generator):
        self.cfg, self.vae, self.frozen_text, self.device, self.generator = cfg, vae, frozen_text, device, generator

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        is_image = batch["is_image"].to(self.device)
        if "latents" in batch:  # from a latent cache
            latents = batch["latents"].to(self.device)
        else:
            video = batch["video"].to(self.device)
            latents = self.vae.encode(video)
        inputs = {"latents": latents, "is_image": is_image, "generator": self.generator}
        if self.frozen_text is not None:
            inputs["text"], inputs["text_mask"] = self.frozen_text(batch["captions"])
        else:
            inputs["captions"] = batch["captions"]
        if self.cfg.text.caption_dropout > 0:
            inputs["dropped"] = drop_captions(batch["captions"], self.cfg.text.caption_dropout, self.generator)
        cascade = self.cfg.cascade
        if cascade is not None:
            temporal = cascade.temporal if video.shape[2] > 1 else 1  # images have no time to subsample
            low = self.vae.encode(downsample_video(video, spatial=cascade.spatial, temporal=temporal))
            cond = upsample_latent(low, *inputs["latents"].shape[2:])
            level = sample_augmentation_logsnr(len(video), *cascade.aug_logsnr, generator=self.generator,
                                               device=self.device)
            inputs["cond"] = augment_condition(cond, level, generator=self.generator)
            inputs["cond_logsnr"] = level
        return inputs


def export_model(out: Path, cfg: DiffusionTrainConfig, engine, ema: EMA, rank: int) -> Path | None:
    """Write `<out_dir>/model/` for from_pretrained: the run's config, the weights gathered from
    their ZeRO shards (model.safetensors) and the EMA weights (ema.safetensors)."""
    import deepspeed

    params = [p for p in engine.module.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()} \
            if rank == 0 else None
    if rank != 0:
        return None
    target = out / "model"
    with atomic_dir(target) as tmp:
        save_config(cfg, tmp / "config.yaml")
        save_file(state, tmp / "model.safetensors")
        save_file(ema.state_dict(), tmp / "ema.safetensors")
    return target
