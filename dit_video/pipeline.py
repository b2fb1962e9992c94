"""Generation: the stages a pipeline folder names, chained (Imagen Video's cascade):

    text -> base -> TSR (more frames) -> SSR (larger frames) -> VAE decode -> pixels

A pipeline folder holds `pipeline.yaml` (a `PipelineConfig`) and the model folders it names,
e.g. checkpoints/tiny/{vae,base,tsr}. Every stage samples in the latent space of the one
VAE: a super-resolution stage sees the previous stage's latent, brought to its own shape
(`upsample_latent`) and noised at a fixed conditioning-augmentation level, as in training.
Each stage's conditioning is a denoiser wrapper (classifier-free guidance, reconstruction
guidance), so any sampler runs any stage.

Longer videos and in-betweens (VDM section 3.1), at memory bounded by one chunk:
- `extend`: each new chunk is conditioned on the last frames of the video so far; at every
  stage, those frames (downsampled to the stage's size and frame rate) are encoded and the
  stage is reconstruction-guided (or, for comparison, replacement-conditioned) on them.
- `interpolate`: a chunk that starts at one given frame and ends at the next; the stage is
  guided on the decoded first and last frames (there is no latent of one last frame alone in a
  causal VAE, so this is guidance through the decoder; replacement is not defined here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Literal

import torch

from vae import VideoVAE

from .config import ConfigError, from_dict, param, read_yaml
from .diffusion import (GuidanceConfig, OscillatingWeight, SamplerConfig, augment_condition, downsample_video,
                        dynamic_thresholding, guided_denoiser, sample, upsample_latent)
from .diffusion.parameterization import Denoiser
from .diffusion.reconstruction import observation_guidance, reconstruction_guidance
from .models.pretrained import DiffusionModel

Method = Literal["guided", "replacement"]


@dataclass
class StageConfig:
    model: str  # a model folder, relative to the pipeline folder
    aug_logsnr: float | None = None  # tsr, ssr: log-SNR of the conditioning augmentation at sampling
    sampler: SamplerConfig | None = None  # None: the pipeline's
    guidance: GuidanceConfig | None = None  # None: the pipeline's


@dataclass
class PipelineConfig:
    vae: str  # the VAE folder, relative to the pipeline folder
    stages: list[StageConfig]  # base first, then tsr / ssr stages in order
    frames: int = param(ge=1)  # default output size, pixels (1 + f*k frames)
    height: int = param(ge=8)
    width: int = param(ge=8)
    fps: float = param(8.0, gt=0)  # of the output
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(steps=25))
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(weight=2.0))
    reconstruction_weight: float = param(2.0, ge=0)  # w_r of extension and interpolation

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: name at least the base stage")


@dataclass
class Stage:
    model: DiffusionModel
    config: StageConfig
    shape: tuple[int, int, int] = (0, 0, 0)  # pixels (frames, height, width) it generates


@dataclass
class Known:
    """What a chunk is conditioned on, in output pixels [B, 3, t, H, W]: `context` frames that
    begin the chunk (extension), or `keyframes` = its first and last frame (interpolation)."""

    context: torch.Tensor | None = None
    keyframes: torch.Tensor | None = None
    method: Method = "guided"
    weight: float = 2.0


class Pipeline:
    def __init__(self, cfg: PipelineConfig, vae: VideoVAE, models: list[DiffusionModel], root: Path | None = None):
        self.config, self.vae, self.root = cfg, vae, root
        self.stages = [Stage(m, c) for m, c in zip(models, cfg.stages)]
        kinds = [m.config.stage for m in models]
        if kinds[0] != "base" or "base" in kinds[1:]:
            raise ConfigError(f"stages: the first must be a base stage and only the first, got {kinds}")
        for stage in self.stages:
            kind, c = stage.model.config.stage, stage.config
            if kind != "base" and c.aug_logsnr is None:
                raise ConfigError(f"stages: {c.model} is a {kind} stage: give its aug_logsnr")
            if kind == "base" and c.aug_logsnr is not None:
                raise ConfigError(f"stages: {c.model}: aug_logsnr applies to super-resolution stages only")
            if stage.model.backbone.config.in_channels != vae.latent_channels:
                raise ConfigError(f"stages: {c.model} was trained on {stage.model.backbone.config.in_channels} "
                                  f"latent channels, the VAE has {vae.latent_channels}")
        try:
            self.set_size(cfg.frames, cfg.height, cfg.width)
        except ValueError as e:  # the folder's own default size: no size of its own to suggest
            raise ConfigError(f"{root or 'pipeline'}: its default size {str(e).split('; e.g.')[0]}") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str = "cpu",
                        weights: Literal["ema", "model"] = "ema") -> "Pipeline":
        """Load `directory/pipeline.yaml` and the folders it names; ConfigError (one line) if
        anything is missing or does not fit."""
        root = Path(directory)
        if not (root / "pipeline.yaml").is_file():
            raise ConfigError(f"{root}: not a pipeline folder (no pipeline.yaml)")
        cfg = from_dict(PipelineConfig, read_yaml(root / "pipeline.yaml"), source=str(root / "pipeline.yaml"))
        vae_dir = root / cfg.vae
        if not (vae_dir / "config.yaml").is_file():
            raise ConfigError(f"{vae_dir}: no VAE folder there (config.yaml missing)")
        try:
            vae = VideoVAE.from_pretrained(vae_dir).to(device).eval().requires_grad_(False)
        except (OSError, RuntimeError, ValueError) as e:
            raise ConfigError(f"{vae_dir}: cannot load the VAE ({str(e).splitlines()[0]})") from None
        models = [DiffusionModel.from_pretrained(root / s.model, weights, device) for s in cfg.stages]
        return cls(cfg, vae, models, root)

    @property
    def device(self) -> torch.device:
        return self.vae.latent_shift.device

    # -- sizes ---------------------------------------------------------------------------------

    def set_size(self, frames: int, height: int, width: int) -> None:
        """Work out each stage's pixel size from the output size, backwards through the
        super-resolution factors; ValueError (one line) if some stage's size breaks the frame
        contract or the patch grid."""
        f, s = self.vae.temporal_factor, self.vae.spatial_factor
        shape, shapes = (frames, height, width), []
        for stage in reversed(self.stages):
            t, h, w = shape
            patch = tuple(getattr(stage.model.backbone.config, "patch", (1, 1, 1)))
            latent = (1 + (t - 1) // f, h // s, w // s)
            if (t - 1) % f or h % s or w % s or any(n % p for n, p in zip(latent, patch)):
                raise ValueError(f"{frames}x{height}x{width} does not fit the pipeline: its {stage.model.config.stage} "
                                 f"stage would make {t}x{h}x{w}, which needs 1 + {f}*k frames and a latent of whole "
                                 f"{patch} patches ({f}x{s}x{s} VAE)" + self._sizes_hint())
            shapes.append(shape)
            cascade = stage.model.config.cascade
            if cascade is not None:
                if (t - 1) % cascade.temporal or h % cascade.spatial or w % cascade.spatial:
                    raise ValueError(f"{frames}x{height}x{width} does not fit the pipeline's "
                                     f"{stage.model.config.stage} factors ({cascade.temporal} in time, "
                                     f"{cascade.spatial} in space)" + self._sizes_hint())
                shape = ((t - 1) // cascade.temporal + 1, h // cascade.spatial, w // cascade.spatial)
        for stage, shape in zip(reversed(self.stages), shapes):
            stage.shape = shape
        self.frames, self.height, self.width = frames, height, width

    def _sizes_hint(self) -> str:
        return f"; e.g. {self.config.frames}x{self.config.height}x{self.config.width}"

    @property
    def temporal_step(self) -> int:
        """Output frames per base latent frame: valid frame counts are 1 + temporal_step * k."""
        factor = self.vae.temporal_factor
        for stage in self.stages:
            if stage.model.config.cascade is not None:
                factor *= stage.model.config.cascade.temporal
        return factor

    # -- one chunk -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 0, sampler: SamplerConfig | str | None = None,
                 guidance: GuidanceConfig | None = None, known: Known | None = None,
                 generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
        """Pixels [B, 3, frames, height, width] in [-1, 1], one video per prompt; video i starts
        from the noise of seed + i (so a prompt gives the same video in any batch, with a
        deterministic sampler). `sampler` / `guidance` replace every stage's settings (a sampler
        named alone, e.g. "pc", only its kind: see stage_settings)."""
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("give at least one prompt, and no empty ones")
        generator = generator or torch.Generator(self.device).manual_seed(seed)
        per_video = [torch.Generator(self.device).manual_seed(seed + i) for i in range(len(prompts))]
        latent = None
        for stage in self.stages:
            latent = self._sample_stage(stage, prompts, per_video, latent, sampler, guidance, known, generator,
                                        progress)
        return self.vae.decode(latent).clamp(-1, 1)

    def _sample_stage(self, stage: Stage, prompts, per_video, previous, sampler, guidance, known, generator, progress):
        """One stage's latent. Its initial noise and conditioning augmentation come from each
        video's own generator (`per_video`), the rest (a stochastic sampler's noise, the draws of
        reconstruction guidance) from the batch's `generator`."""
        model, cfg = stage.model, stage.config
        sampler, guidance = self.stage_settings(stage, sampler, guidance)
        schedule = model.config.diffusion.schedule
        shape = self.vae.latent_shape((len(prompts), 3, *stage.shape))
        text, mask = model.encode_text(prompts)
        kwargs = {"text": text, "text_mask": mask}
        if model.config.cascade is not None:
            level = torch.full((len(prompts),), float(cfg.aug_logsnr), device=self.device)
            cond = augment_condition(upsample_latent(previous, *shape[2:]), level, noise=_noise(shape, per_video))
            kwargs.update(cond=cond, cond_logsnr=level)
        denoiser = self._guided(model, kwargs, guidance, sampler.steps)
        if known is not None:
            denoiser = self._reconstruction(stage, denoiser, known, shape, generator)
        z = _noise(shape, per_video)
        label = f"{model.config.stage} {stage.shape[0]}x{stage.shape[1]}x{stage.shape[2]}" if progress else False
        return sample(denoiser, z, schedule=schedule, generator=generator, progress=label, **sampler.kwargs())

    def stage_settings(self, stage: Stage, sampler: SamplerConfig | str | None = None,
                       guidance: GuidanceConfig | None = None) -> tuple[SamplerConfig, GuidanceConfig]:
        """What a stage samples with: the settings given, else the stage's, else the pipeline's
        (a distilled model runs the steps it was distilled for). A sampler given by name alone
        ("pc") replaces only the kind: each stage keeps its own steps."""
        if sampler is None or isinstance(sampler, str):
            own = stage.config.sampler or self.config.sampler
            if stage.config.sampler is None and stage.model.config.steps is not None:
                own = replace(own, steps=stage.model.config.steps)
            sampler = own if sampler is None else replace(own, sampler=sampler)
        return sampler, guidance or stage.config.guidance or self.config.guidance

    @staticmethod
    def _guided(model: DiffusionModel, kwargs: dict, guidance: GuidanceConfig, steps: int) -> Denoiser:
        """Classifier-free guidance as `guidance` asks; a model with the guidance weight as an
        input (guidance distilled in) gets the weight instead of a second, unconditional pass."""
        denoiser, schedule = model.denoiser(), model.config.diffusion.schedule
        if not model.guidance_input:
            uncond = {**kwargs, "text_mask": torch.zeros_like(kwargs["text_mask"])}  # the null text
            return guided_denoiser(denoiser, kwargs, uncond, guidance, steps=steps, schedule=schedule)
        if guidance.rescale:
            raise ValueError("guidance rescale needs the unguided prediction, which a model with guidance "
                             "distilled in does not make")
        weight = guidance.weight if guidance.weight_low is None else \
            OscillatingWeight(guidance.weight, guidance.weight_low, steps, guidance.high_fraction, schedule)

        def distilled(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
            w = weight(logsnr) if callable(weight) else weight
            w = torch.as_tensor(w, dtype=torch.float32, device=z.device).expand(z.shape[0])
            return denoiser(z, logsnr, guidance=w, **kwargs)

        if guidance.threshold_percentile is not None:
            return dynamic_thresholding(distilled, guidance.threshold_percentile)
        return distilled

    def _stage_view(self, stage: Stage, video: torch.Tensor, keep_frames: bool = False) -> torch.Tensor:
        """Output pixels as this stage sees them: at its size and (unless `keep_frames`) its frame rate."""
        temporal = (self.frames - 1) // (stage.shape[0] - 1) if stage.shape[0] > 1 and not keep_frames else 1
        return downsample_video(video, spatial=self.width // stage.shape[2], temporal=temporal)

    def _reconstruction(self, stage: Stage, denoiser: Denoiser, known: Known, shape, generator) -> Denoiser:
        if known.context is not None:  # the chunk's first frames are given: their latents, by a fresh encode
            context = self._stage_view(stage, known.context)
            latent = self.vae.encode(context)
            values = torch.zeros(shape, device=self.device)
            values[:, :, :latent.shape[2]] = latent
            mask = torch.zeros(1, 1, shape[2], 1, 1, dtype=torch.bool, device=self.device)
            mask[:, :, :latent.shape[2]] = True
            return reconstruction_guidance(denoiser, values, mask, known.weight, method=known.method,
                                           generator=generator)
        # first and last frame given: guided through the decoder
        keyframes = self._stage_view(stage, known.keyframes, keep_frames=True)

        def first_and_last(x_hat: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(x_hat)[:, :, [0, -1]]

        return observation_guidance(denoiser, keyframes, first_and_last, known.weight)

    # -- longer videos ---------------------------------------------------------------------------

    def context_frames(self) -> int:
        """Output frames a new chunk shares with the video before it: the most, up to half the
        chunk, that keeps every stage's share a whole number of latent frames."""
        step = self.temporal_step
        k = max(1, ((self.frames - 1) // 2) // step)
        if 1 + step * k >= self.frames:
            raise ValueError(f"chunks of {self.frames} frames are too short to extend: they need more than "
                             f"{1 + step} frames")
        return 1 + step * k

    def extend(self, prompts: list[str], chunks: int, seed: int = 0, method: Method = "guided",
               weight: float | None = None, sampler: SamplerConfig | str | None = None,
               guidance: GuidanceConfig | None = None, progress: bool = True) -> Iterator[torch.Tensor]:
        """The first chunk, then `chunks` more, each continuing from the last `context_frames()`
        frames of the one before; yields the new frames [B, 3, t, H, W] of each chunk, so a
        caller can write them as they come (memory stays that of one chunk)."""
        if chunks < 0:
            raise ValueError(f"chunks must be >= 0, got {chunks}")
        overlap = self.context_frames() if chunks else 0
        generator = torch.Generator(self.device).manual_seed(seed)
        video = self.generate(prompts, seed, sampler, guidance, generator=generator, progress=progress)
        yield video
        tail = video[:, :, -overlap:] if chunks else None  # the last frames handed out: what the next continues
        for i in range(chunks):
            known = Known(context=tail, method=method,
                          weight=self.config.reconstruction_weight if weight is None else weight)
            new = self.generate(prompts, seed + (i + 1) * len(prompts), sampler, guidance, known, generator,
                                progress)[:, :, overlap:]
            tail = torch.cat([tail, new], dim=2)[:, :, -overlap:]
            yield new

    def interpolate(self, prompts: list[str], keyframes: torch.Tensor, seed: int = 0, weight: float | None = None,
                    sampler: SamplerConfig | str | None = None, guidance: GuidanceConfig | None = None,
                    progress: bool = True) -> Iterator[torch.Tensor]:
        """Fill the frames between consecutive `keyframes` [K, 3, H, W] (K >= 2, output size; the
        same for every prompt): one chunk per pair that starts at one and ends at the next.
        Yields each chunk's frames, without the keyframe the one before already gave."""
        if keyframes.ndim != 4 or len(keyframes) < 2 or tuple(keyframes.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"interpolation needs at least 2 keyframes of 3x{self.height}x{self.width}, "
                             f"got shape {tuple(keyframes.shape)}")
        generator = torch.Generator(self.device).manual_seed(seed)
        keyframes = keyframes.to(self.device)
        for i in range(len(keyframes) - 1):
            pair = keyframes[i:i + 2].transpose(0, 1)[None].expand(len(prompts), -1, -1, -1, -1)
            known = Known(keyframes=pair, weight=self.config.reconstruction_weight if weight is None else weight)
            video = self.generate(prompts, seed + i * len(prompts), sampler, guidance, known, generator, progress)
            yield video if i == 0 else video[:, :, 1:]


def _noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Standard normal noise of `shape`, sample i drawn from generators[i] (float32)."""
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device) for g in generators])


def boundary_jump(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """How much a chunk boundary jumps, per video: the mean absolute change from the last frame
    before it to the first frame after it, over the mean change between neighbouring frames
    inside the chunks (1: as smooth as the rest of the video; larger: a visible cut)."""
    across = (after[:, :, 0] - before[:, :, -1]).abs().flatten(1).mean(1)
    inside = torch.cat([before.diff(dim=2), after.diff(dim=2)], dim=2).abs().flatten(1).mean(1)
    return across / inside.clamp(min=1e-8)


__all__ = ["Pipeline", "PipelineConfig", "StageConfig", "Known", "boundary_jump"]
