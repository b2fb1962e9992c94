"""One entry for every trainable stage, chosen by the config's `stage`:

    python train.py configs/base/tiny.yaml [key=value ...]              one process
    torchrun --nproc_per_node 2 train.py configs/base/tiny.yaml         several, one node
    deepspeed --num_gpus 8 [--hostfile H] train.py configs/base/xl.yaml several nodes

Stages `base`, `tsr` and `ssr` train a diffusion backbone on VAE latents with DeepSpeed ZeRO
(`train_diffusion`, below): buckets of native sizes, joint image-video batches, caption dropout,
cascade conditioning with augmentation, EMA, and checkpoints that resume exactly. Stage `vae`
trains the video autoencoder (`train_vae`) on L1 + L2 reconstruction, a small KL term and an
optional 3D patch discriminator, in one process; it has not moved onto the DeepSpeed loop yet.
"""

from __future__ import annotations

import copy
import glob
import json
import random
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from dit_video.cli import UsageError, config_arguments, exits_cleanly
from dit_video.config import ConfigError, from_dict, load_config, param, read_yaml, save_config
from dit_video.data.image import read_image
from dit_video.data.video import VideoError, read_video
from dit_video.eval.metrics import psnr
from dit_video.models import build_backbone
from dit_video.text import build_text_encoder
from dit_video.training.checkpoint import complete_checkpoints, ensure_universal, read_trainer_state
from dit_video.training.checkpoint import load as checkpoint_load
from dit_video.training.checkpoint import save as checkpoint_save
from dit_video.training.config import DiffusionTrainConfig
from dit_video.training.diffusion import Inputs, backbone_config, check_buckets, export_model, make_loader
from dit_video.training.ema import EMA
from dit_video.training.engine import build_engine, deepspeed_config, device_for, setup_distributed
from dit_video.training.log import RunLog
from dit_video.training.objective import DiffusionObjective
from dit_video.training.preview import write_preview
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


STAGES = {"vae": VAETrainConfig, "base": DiffusionTrainConfig, "tsr": DiffusionTrainConfig,
          "ssr": DiffusionTrainConfig}


def load_train_config(path: str, overrides: list[str]) -> VAETrainConfig | DiffusionTrainConfig:
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


class Stop(Exception):
    """The run cannot go on; the message says why (the last complete checkpoint is intact)."""


class TermSignal:
    """SIGTERM (a scheduler's preemption) asks for a checkpoint and a clean exit at the end of
    the current step; all processes agree on it through the loop's all-reduce."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def launcher_arguments(argv: list[str]) -> list[str]:
    """The arguments without `--local_rank`, which the deepspeed launcher appends (it also sets
    LOCAL_RANK, which is what setup_distributed reads)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local_rank":
            skip = True
        elif not arg.startswith("--local_rank="):
            kept.append(arg)
    return kept


def train_diffusion(cfg: DiffusionTrainConfig) -> dict:
    """The diffusion stages' loop; returns the last logged metrics (on rank 0)."""
    rank, world, local_rank = setup_distributed()
    device = device_for(local_rank)
    out, checkpoints = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
    vae = VideoVAE.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
    text_encoder = build_text_encoder(cfg.text)
    backbone = build_backbone({**backbone_config(cfg, vae, text_encoder.dim),
                               "gradient_checkpointing": cfg.train.gradient_checkpointing})
    check_buckets(cfg, vae, tuple(getattr(backbone.config, "patch", (1, 1, 1))))
    trained_text = text_encoder if cfg.text.encoder == "bytes" else None
    frozen_text = None if trained_text is not None else text_encoder.to(device)
    model = DiffusionObjective(backbone, cfg.diffusion, trained_text)
    loader = make_loader(cfg, rank, world)

    found = complete_checkpoints(checkpoints)
    resume = found[-1] if found else None
    state = read_trainer_state(resume) if resume else None
    same_world = state is None or state["world"] == world
    if resume is not None and not same_world:
        ensure_universal(resume, rank)
    preview_model = copy.deepcopy(model) if rank == 0 and cfg.preview.every else None  # before ZeRO-3 shards it
    micro = (cfg.data.buckets or cfg.data.image_buckets)[0].batch_size
    try:
        ds_config = deepspeed_config(cfg.optim, micro, cfg.train.steps, device, load_universal=not same_world)
    except ValueError as e:
        raise UsageError(str(e)) from None
    engine = build_engine(model, ds_config)
    ema = EMA(engine.module, cfg.train.ema_decay, rank)
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + rank)  # per-process noise
    step, nonfinite_total = 0, 0
    if resume is not None:
        ema_state = checkpoint_load(resume, engine, rank, generator, same_world)
        if ema_state is not None:
            ema.load_state_dict(ema_state)
        loader.load_state_dict(state["data"])  # with another world size the batches split differently
        step, nonfinite_total = state["step"], state["nonfinite"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    log = RunLog(out, rank, cfg.train.steps, step, cfg.train.tensorboard)
    if resume is not None:
        log.message(f"resumed from {resume} at step {step}" + ("" if same_world else
                    f" (written by {state['world']} processes, now {world}: universal checkpoint)"))
    log.message(loader.sampler.describe())
    term, inputs, batches = TermSignal(), Inputs(cfg, vae, frozen_text, device, generator), iter(loader)
    nonfinite_run, metrics, reported = 0, {}, set()

    def save() -> None:
        trainer_state = {"step": step, "world": world, "data": loader.state_dict(), "nonfinite": nonfinite_total}
        checkpoint_save(checkpoints, step, engine, rank, trainer_state, generator, ema.state_dict(),
                        cfg.train.keep_checkpoints)

    while step < cfg.train.steps:
        losses, samples = [], 0
        while len(losses) < cfg.optim.grad_accum:
            batch = next(batches)
            loss = engine(**inputs(batch))
            finite = torch.isfinite(loss.detach()).float().reshape(1)  # on the device: nccl reduces CUDA tensors
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # skip on every process or on none
            if not finite.item():
                nonfinite_run, nonfinite_total = nonfinite_run + 1, nonfinite_total + 1
                log.message(f"step {step + 1}: non-finite loss, batch skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= cfg.train.max_nonfinite:
                    raise Stop(f"{nonfinite_run} non-finite losses in a row at step {step + 1}: stopping; "
                               f"the last complete checkpoint is in {checkpoints}")
                continue
            nonfinite_run = 0
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            samples += len(batch["captions"]) * world
        step += 1
        ema.update()
        mean = torch.stack(losses).mean().reshape(1)
        dist.all_reduce(mean)
        stop = torch.tensor([float(term.received)], device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        metrics = {"loss": mean.item() / world, "lr": engine.get_lr()[0], "nonfinite": nonfinite_total}
        log.step(step, samples, metrics, write=step % cfg.train.log_every == 0 or step == cfg.train.steps)
        for path, reason in loader.skipped.items():
            if path not in reported:
                reported.add(path)
                log.message(f"skipped {reason}")
        if preview_model is not None and step % cfg.preview.every == 0:
            path = write_preview(out / "samples" / f"step_{step:08d}.mp4", preview_model, ema.state_dict(), vae,
                                 frozen_text or preview_model.text_encoder, cfg.preview, cfg.diffusion, device)
            log.message(f"step {step}: sample video {path}")
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop.item():
            save()
        if stop.item():
            log.message(f"SIGTERM: checkpoint of step {step} written, exiting")
            break
    log.close()
    if step == cfg.train.steps:
        path = export_model(out, cfg, engine, ema, rank)
        if path is not None:
            log.message(f"exported {path}")
    dist.destroy_process_group()
    return {"step": step, **metrics}


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    argv = launcher_arguments(sys.argv[1:] if argv is None else argv)
    cfg = load_train_config(*config_arguments(argv, "train.py", __doc__.split("\n\n")[0]))
    if cfg.stage == "vae":
        metrics = train_vae(cfg)
        print(f"step {metrics['step']}: loss {metrics['loss']:.4f}, PSNR {metrics['psnr']:.2f} dB; "
              f"saved to {cfg.out_dir}")
        return
    try:
        train_diffusion(cfg)
    except Stop as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
