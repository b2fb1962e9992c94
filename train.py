"""One entry for every trainable stage, chosen by the config's `stage`:

    python train.py configs/vae/train_tiny.yaml [key=value ...]

Stages: `vae` (the video autoencoder). The loop below is the plain single-process one; the
diffusion stages (base, tsr, ssr, distill) and the DeepSpeed engine come with the training
issue and replace it rather than add a second loop.

The VAE is trained on L1 + L2 reconstruction plus a small KL term, on batches that are either
videos or images (one-frame videos) at `data.image_ratio`, with an optional 3D patch
discriminator (hinge loss) switched on at step `train.discriminator_start`. At the end the
latent statistics are fitted on training clips and the model is saved for `from_pretrained`.
"""

from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from dit_video.cli import UsageError, config_arguments, exits_cleanly
from dit_video.config import ConfigError, from_dict, load_config, param, read_yaml, save_config
from dit_video.data.image import read_image
from dit_video.data.video import VideoError, read_video
from dit_video.eval.metrics import psnr
from vae import VAEConfig, VideoVAE
from vae.losses import (PatchDiscriminator3D, hinge_discriminator_loss, hinge_generator_loss, kl_loss,
                        reconstruction_loss)


@dataclass
class VAEData:
    videos: list[str] = field(default_factory=list)  # paths or glob patterns of video files
    images: list[str] = field(default_factory=list)  # paths or glob patterns of image files
    frames: int = param(9, ge=1)  # frames per training clip: 1 + f*k
    size: int = param(64, ge=8)  # square crops of this many pixels
    image_ratio: float = param(0.25, ge=0, le=1)  # share of batches that are images
    batch_size: int = param(2, ge=1)


@dataclass
class VAETraining:
    steps: int = param(1000, ge=1)
    lr: float = param(1e-3, gt=0)
    kl_weight: float = param(1e-6, ge=0)
    l1_weight: float = param(1.0, ge=0)
    l2_weight: float = param(1.0, ge=0)
    discriminator_start: int | None = param(None, ge=0)  # step at which the GAN loss starts; None: no GAN
    discriminator_weight: float = param(0.1, ge=0)
    discriminator_lr: float = param(2e-4, gt=0)
    log_every: int = param(50, ge=1)
    seed: int = 0
    device: str = "cpu"


@dataclass
class VAETrainConfig:
    stage: Literal["vae"]
    model: str  # a VAE model config (YAML), e.g. configs/vae/tiny.yaml
    out_dir: str
    data: VAEData = field(default_factory=VAEData)
    train: VAETraining = field(default_factory=VAETraining)


STAGES = {"vae": VAETrainConfig}


def load_train_config(path: str, overrides: list[str]) -> VAETrainConfig:
    stage = read_yaml(path).get("stage")
    for item in overrides:
        if item.startswith("stage="):
            stage = item.partition("=")[2]
    if stage not in STAGES:
        raise ConfigError(f"{path}: stage: expected one of {', '.join(map(repr, STAGES))}, got {stage!r}")
    return load_config(STAGES[stage], path, overrides)


def expand(patterns: list[str]) -> list[str]:
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise UsageError(f"{pattern}: matches no file")
        paths += matches
    return paths


class ClipSampler:
    """Random training batches: windows of `frames` consecutive frames from videos held in memory,
    or single images. Unreadable or too short files are skipped, counted and named once."""

    def __init__(self, data: VAEData, temporal_factor: int, generator: random.Random):
        self.data, self.rng = data, generator
        size = (data.size, data.size)
        self.videos, self.images, self.skipped = [], [], []
        for path in expand(data.videos):
            try:
                clip = read_video(path, size=size)
            except VideoError as e:
                self.skipped.append(str(e))
                continue
            if clip.shape[1] < data.frames:
                self.skipped.append(f"{path}: {clip.shape[1]} frames, fewer than the {data.frames} asked for")
            else:
                self.videos.append(clip)
        for path in expand(data.images):
            try:
                self.images.append(read_image(path, size))
            except VideoError as e:
                self.skipped.append(str(e))
        if not self.videos and not self.images:
            raise UsageError("no usable training data (check data.videos and data.images)")
        if self.videos and (data.frames - 1) % temporal_factor:
            raise UsageError(f"data.frames = {data.frames}: the VAE needs 1 + {temporal_factor}*k frames")

    def batch(self) -> torch.Tensor:
        use_images = self.images and (not self.videos or self.rng.random() < self.data.image_ratio)
        items = []
        for _ in range(self.data.batch_size):
            if use_images:
                items.append(self.rng.choice(self.images))
            else:
                clip = self.rng.choice(self.videos)
                start = self.rng.randrange(clip.shape[1] - self.data.frames + 1)
                items.append(clip[:, start:start + self.data.frames])
        x = torch.stack(items)
        return x.flip(-1) if self.rng.random() < 0.5 else x


def train_vae(cfg: VAETrainConfig, progress: bool = True) -> dict:
    """Train, fit the latent statistics, save to cfg.out_dir; returns the last logged metrics."""
    torch.manual_seed(cfg.train.seed)
    device = torch.device(cfg.train.device)
    vae_cfg = from_dict(VAEConfig, read_yaml(cfg.model), source=cfg.model)
    out = Path(cfg.out_dir)
    data = ClipSampler(cfg.data, vae_cfg.temporal_factor, random.Random(cfg.train.seed))
    for line in data.skipped:
        print(f"skipped {line}")

    vae = VideoVAE(vae_cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.train.lr, betas=(0.9, 0.99), weight_decay=0.0)
    disc = disc_opt = None
    if cfg.train.discriminator_start is not None:
        disc = PatchDiscriminator3D(vae_cfg.in_channels).to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.train.discriminator_lr, betas=(0.5, 0.9))

    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "train_config.yaml")
    log_path, metrics = out / "metrics.jsonl", {}
    bar = tqdm(range(1, cfg.train.steps + 1), desc="vae", disable=not progress)
    for step in bar:
        x = data.batch().to(device)
        x_hat, mean, logvar = vae(x)
        rec = reconstruction_loss(x, x_hat, cfg.train.l1_weight, cfg.train.l2_weight)
        kl = kl_loss(mean, logvar)
        loss = rec + cfg.train.kl_weight * kl
        gan_on = disc is not None and step > cfg.train.discriminator_start
        if gan_on:
            loss = loss + cfg.train.discriminator_weight * hinge_generator_loss(disc(x_hat))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:
            d_loss = hinge_discriminator_loss(disc(x), disc(x_hat.detach()))
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics = {"step": step, "loss": loss.item(), "reconstruction": rec.item(), "kl": kl.item(),
                       "psnr": psnr(x_hat.detach().clamp(-1, 1), x).mean().item(),
                       **({"discriminator": d_loss.item()} if gan_on else {})}
            with open(log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", psnr=f"{metrics['psnr']:.1f}")

    vae.eval()
    vae.fit_latent_stats(data.batch().to(device) for _ in range(8))
    vae.save_pretrained(out)
    return metrics


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    cfg = load_train_config(*config_arguments(argv, "train.py", __doc__.split("\n\n")[0]))
    metrics = train_vae(cfg)
    print(f"step {metrics['step']}: loss {metrics['loss']:.4f}, PSNR {metrics['psnr']:.2f} dB; "
          f"saved to {cfg.out_dir}")


if __name__ == "__main__":
    main()
