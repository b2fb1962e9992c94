"""The stages around the one training loop of train.py. A stage builds the module the engine
trains (`model`) and its data (`loader`), turns a batch into the engine's inputs (`inputs`), may
act after a step (`after_step`: sample videos) and exports the result (`export`).

- DiffusionStage: base, tsr, ssr (a backbone on the latents of a frozen VAE).
- VAEStage: vae (the autoencoder and its discriminator on pixels).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

from vae import VAEConfig, VideoVAE
from vae.losses import PatchDiscriminator3D

from ..cli import UsageError
from ..config import ConfigError, from_dict, read_yaml, save_config
from ..data import BucketConfig, BucketSampler, Loader, MediaDataset, read_manifest
from ..data.latent_cache import LatentDataset
from ..diffusion import augment_condition, downsample_video, sample_augmentation_logsnr, upsample_latent
from ..files import atomic_dir
from ..models import build_backbone
from ..text import build_text_encoder, drop_captions
from .config import DiffusionTrainConfig, VAETrainConfig
from .ema import EMA
from .objective import DiffusionObjective, VAEObjective
from .preview import write_preview


def build_stage(cfg: DiffusionTrainConfig | VAETrainConfig, rank: int, world: int, device: torch.device,
                generator: torch.Generator) -> DiffusionStage | VAEStage:
    stage = VAEStage if cfg.stage == "vae" else DiffusionStage
    return stage(cfg, rank, world, device, generator)


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


def make_loader(cfg: DiffusionTrainConfig | VAETrainConfig, rank: int, world: int) -> Loader:
    data = cfg.data
    try:
        if data.latents:
            videos = LatentDataset(data.latents)
            videos.check_vae(cfg.vae)  # only the diffusion stages take latents
        else:
            videos = MediaDataset(read_manifest(data.videos), "video", fps=data.fps, stride=data.stride) \
                if data.videos else None
        images = MediaDataset(read_manifest(data.images), "image") if data.images else None
        sampler = BucketSampler(len(videos) if videos else 0, len(images) if images else 0, data.buckets,
                                data.image_buckets, data.image_ratio, seed=cfg.train.seed, rank=rank, world=world)
    except ValueError as e:  # a bad manifest or bucket set: the user's input
        raise UsageError(f"data: {e}") from None
    return Loader(videos, images, sampler, num_workers=data.num_workers)


class DiffusionStage:
    """base, tsr, ssr: a backbone (and the byte-level text encoder) trained on the latents of a
    frozen VAE. `inputs` turns a loader batch into the engine's inputs: latents, text for a frozen
    encoder and, for the cascade stages, the augmented low-resolution latent and its level."""

    def __init__(self, cfg: DiffusionTrainConfig, rank: int, world: int, device: torch.device,
                 generator: torch.Generator):
        self.cfg, self.rank, self.device, self.generator = cfg, rank, device, generator
        self.vae = VideoVAE.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
        text_encoder = build_text_encoder(cfg.text)
        backbone = build_backbone({**backbone_config(cfg, self.vae, text_encoder.dim),
                                   "gradient_checkpointing": cfg.train.gradient_checkpointing})
        check_buckets(cfg, self.vae, tuple(getattr(backbone.config, "patch", (1, 1, 1))))
        trained_text = text_encoder if cfg.text.encoder == "bytes" else None
        self.frozen_text = None if trained_text is not None else text_encoder.to(device)
        self.model = DiffusionObjective(backbone, cfg.diffusion, trained_text)
        self.loader = make_loader(cfg, rank, world)
        # rank 0's own copy for sample videos, made before ZeRO-3 shards the original
        self.preview = copy.deepcopy(self.model) if rank == 0 and cfg.preview.every else None

    @torch.no_grad()
    def inputs(self, batch: dict, step: int) -> dict:
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

    def after_step(self, step: int, ema: EMA, out: Path) -> str | None:
        """Every `preview.every` steps, rank 0 writes sample videos from the EMA weights."""
        if self.preview is None or step % self.cfg.preview.every:
            return None
        path = write_preview(out / "samples" / f"step_{step:08d}.mp4", self.preview, ema.state_dict(), self.vae,
                             self.frozen_text or self.preview.text_encoder, self.cfg.preview, self.cfg.diffusion,
                             self.device)
        return f"step {step}: sample video {path}"

    def export(self, out: Path, engine, ema: EMA) -> Path | None:
        return export_model(out, self.cfg, engine, ema, self.rank)


class VAEStage:
    """vae: the video autoencoder (and its discriminator) on pixels; exported, with its latent
    statistics fitted on training clips, as a `from_pretrained` folder."""

    def __init__(self, cfg: VAETrainConfig, rank: int, world: int, device: torch.device,
                 generator: torch.Generator):
        self.cfg, self.rank, self.device, self.generator = cfg, rank, device, generator
        vae = VideoVAE(from_dict(VAEConfig, read_yaml(cfg.model), source=cfg.model))
        f, s = vae.temporal_factor, vae.spatial_factor
        for key, buckets in (("data.buckets", cfg.data.buckets), ("data.image_buckets", cfg.data.image_buckets)):
            for i, b in enumerate(buckets):
                if (b.frames - 1) % f or b.height % s or b.width % s:
                    raise ConfigError(f"{key}[{i}]: {b.frames}x{b.height}x{b.width} does not fit the VAE: frames "
                                      f"must be 1 + {f}*k, height and width multiples of {s}")
        loss = cfg.loss
        discriminator = PatchDiscriminator3D(vae.config.in_channels) if loss.discriminator_start is not None else None
        self.model = VAEObjective(vae, loss.kl_weight, loss.l1_weight, loss.l2_weight, discriminator,
                                  loss.discriminator_weight)
        self.loader = make_loader(cfg, rank, world)

    def inputs(self, batch: dict, step: int) -> dict:
        start = self.cfg.loss.discriminator_start
        return {"video": batch["video"].to(self.device), "generator": self.generator,
                "adversarial": start is not None and step >= start}

    def after_step(self, step: int, ema: EMA, out: Path) -> str | None:
        return None

    def export(self, out: Path, engine, ema: EMA) -> Path | None:
        """`<out_dir>/model/`: the trained VAE with per-channel latent statistics fitted on 8
        training batches (rank 0, its own pass over the data)."""
        state = gathered_state(engine, self.rank)
        if self.rank != 0:
            return None
        vae = VideoVAE(self.model.vae.config)
        vae.load_state_dict({k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")})
        vae.to(self.device).eval()
        batches = iter(make_loader(self.cfg, 0, 1))
        with torch.no_grad():
            vae.fit_latent_stats(next(batches)["video"].to(self.device) for _ in range(8))
        with atomic_dir(out / "model") as tmp:
            vae.save_pretrained(tmp)
            save_config(self.cfg, tmp / "train_config.yaml")
        return out / "model"


def gathered_state(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """The engine's whole float32 state dict on rank 0, gathered from its ZeRO shards (None elsewhere)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        if rank != 0:
            return None
        return {k: v.detach().float().cpu().contiguous() for k, v in engine.module.state_dict().items()}


def export_model(out: Path, cfg: DiffusionTrainConfig, engine, ema: EMA, rank: int) -> Path | None:
    """Write `<out_dir>/model/` for from_pretrained: the run's config, the weights gathered from
    their ZeRO shards (model.safetensors) and the EMA weights (ema.safetensors)."""
    state = gathered_state(engine, rank)
    if rank != 0:
        return None
    target = out / "model"
    with atomic_dir(target) as tmp:
        save_config(cfg, tmp / "config.yaml")
        save_file(state, tmp / "model.safetensors")
        save_file(ema.state_dict(), tmp / "ema.safetensors")
    return target
