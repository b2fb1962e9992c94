"""The stages around the one training loop of train.py. A stage builds the module the engine
trains (`model`) and its data (`loader`), turns a batch into the engine's inputs (`inputs`), may
act after a step (`after_step`: sample videos) and exports the result (`export`).

- DiffusionStage: base, tsr, ssr (a backbone on the latents of a frozen VAE).
- DistillStage: distill (a round of progressive distillation of a trained diffusion model).
- VAEStage: vae (the autoencoder and its discriminator on pixels).

`preflight` makes the checks that read files but need no process group (a distill run's
teacher), so that train.py reports a bad run in one line before it starts anything.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from vae import VAEConfig, VideoVAE
from vae.losses import PatchDiscriminator3D

from ..cli import UsageError, check_output_dir
from ..config import ConfigError, from_dict, read_yaml, save_config
from ..data import BucketConfig, BucketSampler, Loader, MediaDataset, Shape, read_manifest
from ..data.latent_cache import LatentDataset
from ..diffusion import (CascadeConfig, augment_condition, classifier_free_guidance, diffuse, distillation_levels,
                         distillation_target, downsample_video, sample_augmentation_logsnr, upsample_latent)
from ..diffusion.parameterization import Denoiser
from ..files import atomic_dir
from ..models import BACKBONES, build_backbone, compile_blocks
from ..models.pretrained import DiffusionModel, DiffusionModelConfig
from ..text import build_text_encoder, drop_captions
from .config import DiffusionTrainConfig, DistillTrainConfig, VAETrainConfig
from .ema import EMA
from .engine import zero_section
from .objective import DiffusionObjective, DistillObjective, VAEObjective
from .preview import write_preview


TrainRun = DiffusionTrainConfig | DistillTrainConfig | VAETrainConfig


def build_stage(cfg: TrainRun, rank: int, world: int, device: torch.device,
                generator: torch.Generator) -> DiffusionStage | DistillStage | VAEStage:
    stage = {"vae": VAEStage, "distill": DistillStage}.get(cfg.stage, DiffusionStage)
    return stage(cfg, rank, world, device, generator)


def preflight(cfg: TrainRun) -> None:
    """One-line errors for what a config cannot show by itself but the file system does: an
    out_dir that cannot be made, an unreadable DeepSpeed file (and ZeRO-3 set in it for a VAE with
    GAN losses), a distill run's teacher and VAE; before any process group, loading or writing."""
    check_output_dir(cfg.out_dir)
    try:
        zero = zero_section(cfg.optim)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.stage == "vae" and cfg.loss.discriminator_start is not None and zero.get("stage", 0) == 3:
        raise ConfigError(f"loss.discriminator_start: the GAN losses need ZeRO stage <= 2; {cfg.optim.deepspeed} "
                          f"sets stage 3")
    if cfg.stage == "distill":
        distill_teacher_config(cfg)


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


def check_buckets(cfg: DiffusionTrainConfig, vae: VideoVAE | VAEConfig, patch: tuple[int, int, int],
                  stage: str | None = None, cascade: CascadeConfig | None = None) -> None:
    """Every bucket must map to whole latent patches (frames 1 + f*k for a causal VAE). `stage` and
    `cascade` default to the run's (a distill run passes its teacher's)."""
    f, s = vae.temporal_factor, vae.spatial_factor
    if stage is None:
        stage, cascade = cfg.stage, cfg.cascade
    preview = [BucketConfig(cfg.preview.frames, cfg.preview.height, cfg.preview.width, 1)] \
        if getattr(cfg, "preview", None) and cfg.preview.every else []
    for key, buckets in (("data.buckets", cfg.data.buckets), ("data.image_buckets", cfg.data.image_buckets),
                         ("preview", preview)):
        for i, b in enumerate(buckets):
            frames_ok = (b.frames - 1) % f == 0 and ((b.frames - 1) // f + 1) % patch[0] == 0
            if cascade and stage == "tsr" and b.frames > 1:
                frames_ok = frames_ok and (b.frames - 1) % (f * cascade.temporal) == 0
            size_ok = all(x % (s * p * (cascade.spatial if cascade else 1)) == 0
                          for x, p in ((b.height, patch[1]), (b.width, patch[2])))
            if not (frames_ok and size_ok):
                raise ConfigError(f"{key}[{i}]: {b.frames}x{b.height}x{b.width} does not fit the VAE "
                                  f"({f}x{s}x{s}), the patch {patch} and the cascade factors: frames must be "
                                  f"1 + {f}*k, height and width multiples of {s} x patch x spatial factor")


def make_loader(cfg: TrainRun, rank: int, world: int, cascade: CascadeConfig | None = None) -> Loader:
    """The run's data; `cascade`, a super-resolution stage's factors, which a latent cache must
    have been made with (its low-resolution latents are that stage's condition)."""
    data = cfg.data
    try:
        if data.latents:
            videos = LatentDataset(data.latents)
            videos.check_vae(cfg.vae)  # only the diffusion stages take latents
            check_cascade_cache(videos, data.buckets, cascade)
        else:
            videos = MediaDataset(read_manifest(data.videos), "video", fps=data.fps, stride=data.stride) \
                if data.videos else None
        images = MediaDataset(read_manifest(data.images), "image") if data.images else None
        sampler = BucketSampler(len(videos) if videos else 0, len(images) if images else 0, data.buckets,
                                data.image_buckets, data.image_ratio, seed=cfg.train.seed, rank=rank, world=world)
    except ValueError as e:  # a bad manifest or bucket set: the user's input
        raise UsageError(f"data: {e}") from None
    return Loader(videos, images, sampler, num_workers=data.num_workers)


def check_cascade_cache(cache: LatentDataset, buckets: list[BucketConfig], cascade: CascadeConfig | None) -> None:
    """ValueError unless every bucket's cached shape holds the low-resolution latents of
    `cascade`'s factors (a base stage's cache needs none)."""
    if cascade is None:
        return
    want = (cascade.spatial, cascade.temporal)
    for b in buckets:
        made = cache.cascade.get(Shape(b.frames, b.height, b.width), want)  # an uncached shape: the Loader says so
        if made != want:
            found = "no low-resolution latents" if made is None else f"those of spatial {made[0]}, temporal {made[1]}"
            raise ValueError(f"{cache.root}: {b.frames}x{b.height}x{b.width} holds {found}; this stage needs those of "
                             f"spatial {want[0]}, temporal {want[1]}: cache it with --cascade-spatial {want[0]} "
                             f"--cascade-temporal {want[1]}")


class DiffusionStage:
    """base, tsr, ssr: a backbone (and the byte-level text encoder) trained on the latents of a
    frozen VAE. `inputs` turns a loader batch into the engine's inputs: latents, text for a frozen
    encoder and, for the cascade stages, the augmented low-resolution latent and its level."""

    def __init__(self, cfg: DiffusionTrainConfig, rank: int, world: int, device: torch.device,
                 generator: torch.Generator):
        self.cfg, self.rank, self.device, self.generator = cfg, rank, device, generator
        self.vae = VideoVAE.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
        try:
            text_encoder = build_text_encoder(cfg.text)
        except ValueError as e:  # a T5 folder that is not one: the user's input
            raise ConfigError(str(e)) from None
        self.backbone_config = backbone_config(cfg, self.vae, text_encoder.dim)
        backbone = build_backbone({**self.backbone_config, "gradient_checkpointing": cfg.train.gradient_checkpointing})
        check_buckets(cfg, self.vae, tuple(getattr(backbone.config, "patch", (1, 1, 1))))
        trained_text = text_encoder if text_encoder.trainable else None
        self.frozen_text = None if trained_text is not None else text_encoder.to(device)
        self.model = DiffusionObjective(backbone, cfg.diffusion, trained_text)
        self.loader = make_loader(cfg, rank, world, cfg.cascade)
        # rank 0's own copy for sample videos, made before ZeRO-3 shards the original
        self.preview = copy.deepcopy(self.model) if rank == 0 and cfg.preview.every else None
        # after the copy: sample videos come now and then, at other shapes
        self.compiled_blocks = compile_backbone(backbone) if cfg.train.compile else 0

    @torch.no_grad()
    def inputs(self, batch: dict, step: int) -> dict:
        is_image = batch["is_image"].to(self.device)
        video, latents = batch_latents(batch, self.vae, self.device)
        inputs = {"latents": latents, "is_image": is_image, "generator": self.generator}
        if self.frozen_text is not None:
            inputs["text"], inputs["text_mask"] = self.frozen_text(batch["captions"])
        else:
            inputs["captions"] = batch["captions"]
        if self.cfg.text.caption_dropout > 0:
            inputs["dropped"] = drop_captions(batch["captions"], self.cfg.text.caption_dropout, self.generator)
        if self.cfg.cascade is not None:
            inputs["cond"], inputs["cond_logsnr"] = cascade_condition(self.vae, batch, video, latents,
                                                                      self.cfg.cascade, self.generator)
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
        model = DiffusionModelConfig(self.cfg.stage, self.backbone_config, self.cfg.text, self.cfg.diffusion,
                                     self.cfg.cascade)
        return export_model(out, model, self.cfg, engine, ema, self.rank)


def batch_latents(batch: dict, vae: VideoVAE, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(pixels, latents) of a batch on `device`: from a latent cache (no pixels), else the clips and
    their encoding by the VAE."""
    if "latents" in batch:
        return None, batch["latents"].to(device)
    video = batch["video"].to(device)
    return video, vae.encode(video)


def compile_backbone(backbone: nn.Module) -> int:
    """train.compile: compile_blocks, its refusal as the user's config error."""
    try:
        return compile_blocks(backbone)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from None


def cascade_condition(vae: VideoVAE, batch: dict, video: torch.Tensor | None, latents: torch.Tensor,
                      cascade: CascadeConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A super-resolution stage's input for a batch: the video downsampled and encoded (or its
    latent from the cache), upsampled to the latents' shape and noised at an augmentation level
    drawn per sample: (cond, its level)."""
    if "low_latents" in batch:
        low = batch["low_latents"].to(latents.device)
    else:
        temporal = cascade.temporal if video.shape[2] > 1 else 1  # images have no time to subsample
        low = vae.encode(downsample_video(video, spatial=cascade.spatial, temporal=temporal))
    cond = upsample_latent(low, *latents.shape[2:])
    level = sample_augmentation_logsnr(len(latents), *cascade.aug_logsnr, generator=generator, device=latents.device)
    return augment_condition(cond, level, generator=generator), level


def distill_teacher_config(cfg: DistillTrainConfig) -> DiffusionModelConfig:
    """The teacher's config, checked against the run (ConfigError in one line): a distilled
    teacher samples in 2N steps, a v or x prediction, a guidance input only with guidance
    distilled, data and VAE that fit its latents and patches."""
    folder = Path(cfg.teacher)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"teacher: {folder}: not a model folder (no config.yaml); give a train.py export")
    teacher = from_dict(DiffusionModelConfig, read_yaml(folder / "config.yaml"), source=str(folder / "config.yaml"))
    n = cfg.student_steps
    if teacher.steps is not None and teacher.steps != 2 * n:
        half = f"so student_steps must be {teacher.steps // 2}" if teacher.steps % 2 == 0 else "which do not halve"
        raise ConfigError(f"student_steps: the teacher {folder} was distilled for {teacher.steps} sampling steps, "
                          f"{half} (the teacher runs 2 x student_steps), got {n}")
    if teacher.diffusion.prediction == "eps":
        raise ConfigError(f"teacher: {folder} predicts eps; distillation needs a v or x prediction (x from eps "
                          "divides by alpha, which vanishes at the few-step student's noisiest levels)")
    if bool(teacher.backbone.get("guidance_input", False)) and cfg.guidance.weights is None:
        raise ConfigError(f"guidance: the teacher {folder} takes a guidance weight (guidance was distilled into "
                          "it): set guidance.weights")
    vae_file = Path(cfg.vae) / "config.yaml"
    if not vae_file.is_file():
        raise ConfigError(f"vae: {cfg.vae}: not a VAE model folder (no config.yaml)")
    vae = from_dict(VAEConfig, read_yaml(vae_file), source=str(vae_file))
    backbone = teacher.backbone
    if backbone.get("name") not in BACKBONES:
        raise ConfigError(f"{folder / 'config.yaml'}: backbone.name: expected one of {', '.join(BACKBONES)}")
    shape = from_dict(BACKBONES[backbone["name"]][0], backbone, source=f"{folder / 'config.yaml'}: backbone")
    if shape.in_channels != vae.latent_channels:
        raise ConfigError(f"vae: {cfg.vae} makes {vae.latent_channels}-channel latents, the teacher takes "
                          f"{shape.in_channels}")
    check_buckets(cfg, vae, tuple(getattr(shape, "patch", (1, 1, 1))), teacher.stage, teacher.cascade)
    return teacher


def student_backbone(teacher: nn.Module, config: dict, gradient_checkpointing: bool = False) -> nn.Module:
    """The network of `config` (the teacher's, maybe with the guidance input) holding the teacher's
    weights; only a new guidance embedding keeps its initialization, which adds exactly 0."""
    student = build_backbone({**config, "gradient_checkpointing": gradient_checkpointing})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("conditioning.guidance.")]
    if new or unexpected:
        raise ConfigError(f"the student does not fit the teacher's weights (missing {new[:3]}, "
                          f"unexpected {unexpected[:3]})")
    return student


class DistillStage:
    """distill: one round of progressive distillation. The frozen teacher, outside the engine like
    the VAE, makes each batch's targets in `inputs`; the engine trains the student: the teacher's
    network (with the guidance input when guidance is distilled) and its byte-level text encoder,
    both started from the teacher's weights.

    A step's draws from the loop's generator, in order: caption dropout, the cascade's
    augmentation (tsr, ssr), the guidance weights, the student levels, the noise.
    """

    def __init__(self, cfg: DistillTrainConfig, rank: int, world: int, device: torch.device,
                 generator: torch.Generator):
        self.cfg, self.rank, self.device, self.generator = cfg, rank, device, generator
        distill_teacher_config(cfg)
        self.teacher = DiffusionModel.from_pretrained(cfg.teacher, cfg.teacher_weights, device)
        self.vae = VideoVAE.from_pretrained(cfg.vae).to(device).eval().requires_grad_(False)
        teacher = self.teacher.config
        self.backbone_config = dict(teacher.backbone)
        if cfg.guidance.weights is not None:
            self.backbone_config["guidance_input"] = True
        backbone = student_backbone(self.teacher.backbone, self.backbone_config, cfg.train.gradient_checkpointing)
        self.compiled_blocks = 0
        if cfg.train.compile:  # the teacher too: its two (guided: four) forwards per step cost more than the student's
            self.compiled_blocks = compile_backbone(backbone) + compile_backbone(self.teacher.backbone)
        trains_text = self.teacher.text_encoder.trainable  # else a frozen T5, shared with the teacher
        text = copy.deepcopy(self.teacher.text_encoder).train().requires_grad_(True) if trains_text else None
        self.model = DistillObjective(backbone, teacher.diffusion.prediction, text)
        self.loader = make_loader(cfg, rank, world, teacher.cascade)

    def teacher_denoiser(self, w: torch.Tensor | None, **conditioning) -> Denoiser:
        """The teacher as the denoiser whose two steps the student learns: guided with the weights
        w by classifier-free guidance (the null text: an all-False mask), or told w if guidance
        was distilled into it already."""
        denoise = self.teacher.denoiser()
        if w is not None and self.teacher.guidance_input:
            conditioning["guidance"] = w
        elif w is not None:
            uncond = {**conditioning, "text_mask": torch.zeros_like(conditioning["text_mask"])}
            return classifier_free_guidance(denoise, w, conditioning, uncond)
        return lambda z, logsnr: denoise(z, logsnr, **conditioning)

    @torch.no_grad()
    def inputs(self, batch: dict, step: int) -> dict:
        teacher, cfg, generator, device = self.teacher.config, self.cfg, self.generator, self.device
        video, latents = batch_latents(batch, self.vae, device)
        latents = latents.float()
        captions, size = batch["captions"], len(latents)
        conditioning = {"is_image": batch["is_image"].to(device)}
        conditioning["text"], conditioning["text_mask"] = self.teacher.encode_text(captions)
        dropped = drop_captions(captions, cfg.caption_dropout, generator) if cfg.caption_dropout > 0 else None
        if dropped is not None:
            conditioning["text_mask"] = conditioning["text_mask"] & ~dropped.to(device)[:, None]
        if teacher.cascade is not None:
            conditioning["cond"], conditioning["cond_logsnr"] = cascade_condition(self.vae, batch, video, latents,
                                                                                  teacher.cascade, generator)
        w = None
        if cfg.guidance.weights is not None:
            low, high = cfg.guidance.weights
            w = (low + (high - low) * torch.rand(size, generator=generator, device=generator.device)).to(device)
        levels = distillation_levels(cfg.student_steps, size, teacher.diffusion.schedule, generator, device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(device)
        z = diffuse(latents, levels.t, noise)
        target = distillation_target(self.teacher_denoiser(w, **conditioning), z, levels)
        inputs = {"z": z, "logsnr": levels.t, "target": target, **conditioning}
        if self.model.text_encoder is not None:  # the student encodes the captions with its own encoder
            del inputs["text"], inputs["text_mask"]
            inputs["captions"] = captions
            if dropped is not None:
                inputs["dropped"] = dropped
        if w is not None:
            inputs["guidance"] = w
        return inputs

    def after_step(self, step: int, ema: EMA, out: Path) -> str | None:
        return None

    def export(self, out: Path, engine, ema: EMA) -> Path | None:
        """A DiffusionModel folder like the teacher's, with `steps: N` (and the guidance input):
        the teacher of the next round, and what sampling loads."""
        teacher = self.teacher.config
        # the teacher's prediction and schedule; the weighting the student was trained with
        diffusion = dataclasses.replace(teacher.diffusion, weighting="truncated_snr", min_snr_gamma=5.0)
        model = DiffusionModelConfig(teacher.stage, self.backbone_config, teacher.text, diffusion,
                                     teacher.cascade, steps=self.cfg.student_steps)
        return export_model(out, model, self.cfg, engine, ema, self.rank)


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
        self.compiled_blocks = 0
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


def export_model(out: Path, model_config: DiffusionModelConfig, cfg: DiffusionTrainConfig | DistillTrainConfig,
                 engine, ema: EMA, rank: int) -> Path | None:
    """Write `<out_dir>/model/` for DiffusionModel.from_pretrained: the model's config (the backbone
    written out in full), the weights gathered from their ZeRO shards, the EMA weights and the
    run's config."""
    state = gathered_state(engine, rank)
    if rank != 0:
        return None
    model = DiffusionModel(model_config)
    model.load_state_dict(state, strict=False)
    with atomic_dir(out / "model") as tmp:
        model.save_pretrained(tmp, ema.state_dict())
        save_config(cfg, tmp / "train_config.yaml")
    return out / "model"
