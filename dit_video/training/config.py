"""The config of a training run, one YAML file with every key checked: the diffusion stages (base,
tsr, ssr), the distillation stage and the VAE stage share the data, optimization and run sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import param
from ..data.buckets import BucketConfig
from ..diffusion import CascadeConfig, DiffusionConfig
from ..text import TextConfig
from .engine import OptimConfig
from .preview import PreviewConfig


@dataclass
class DataConfig:
    videos: str | None = None  # manifest (JSONL: path, caption, optional fps) of training videos
    latents: str | None = None  # or a latent cache of them (python -m dit_video.data.latent_cache)
    images: str | None = None  # manifest of images for joint image-video training
    image_ratio: float = param(0.0, ge=0, le=1)  # share of batches that are image batches
    fps: float | None = param(None, gt=0)  # sample frames at this rate (else every `stride`-th)
    stride: int = param(1, ge=1)
    buckets: list[BucketConfig] = field(default_factory=list)  # video shapes (pixels), batch per process
    image_buckets: list[BucketConfig] = field(default_factory=list)  # frames 1
    num_workers: int = param(0, ge=0)

    def __post_init__(self):
        if self.videos and self.latents:
            raise ValueError("data.videos and data.latents are two sources of the same clips: give one")
        if self.latents and (self.fps is not None or self.stride != 1):
            raise ValueError("data.fps and data.stride were fixed when the latent cache was made")
        if not (self.videos or self.latents or self.images):
            raise ValueError("give data.videos (or data.latents) and/or data.images")
        if bool(self.videos or self.latents) != bool(self.buckets):
            raise ValueError("data.videos (or data.latents) and data.buckets go together")
        if bool(self.images) != bool(self.image_buckets):
            raise ValueError("data.images and data.image_buckets go together")


@dataclass
class TrainConfig:
    steps: int = param(1000, ge=1)  # optimizer steps
    seed: int = 0
    ema_decay: float = param(0.999, gt=0, lt=1)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each backbone block (models.compile_blocks); the first steps compile
    checkpoint_every: int = param(500, ge=1)
    keep_checkpoints: int = param(2, ge=2)
    log_every: int = param(10, ge=1)
    tensorboard: bool = True
    max_nonfinite: int = param(10, ge=1)  # stop after this many non-finite losses in a row


@dataclass
class DiffusionTrainConfig:
    stage: Literal["base", "tsr", "ssr"]
    out_dir: str
    vae: str  # a VAE model folder (from_pretrained)
    backbone: str | dict[str, Any]  # a backbone config: YAML path or mapping (in/cond/text channels are filled in)
    data: DataConfig
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    cascade: CascadeConfig | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)

    def __post_init__(self):
        if self.preview.every and self.stage != "base":
            raise ValueError("preview: sample videos are written by the base stage only (a super-resolution "
                             "stage needs a low-resolution input)")
        if (self.stage == "base") != (self.cascade is None):
            raise ValueError("cascade: set it for the tsr and ssr stages, and only for them")
        if self.cascade is not None:
            factor = self.cascade.temporal if self.stage == "tsr" else self.cascade.spatial
            other = self.cascade.spatial if self.stage == "tsr" else self.cascade.temporal
            if factor < 2 or other != 1:
                which = "temporal" if self.stage == "tsr" else "spatial"
                raise ValueError(f"stage {self.stage}: cascade.{which} must be >= 2 and the other factor 1")


@dataclass
class DistillGuidanceConfig:
    """Classifier-free guidance distilled into the student: per training sample a weight w drawn
    uniformly from `weights`, the teacher guided with it ((1 + w) x_c - w x_u), the student told w."""

    weights: tuple[float, float] | None = None  # [low, high], 0 <= low <= high; None: no guidance distilled


@dataclass
class DistillTrainConfig:
    """One round of progressive distillation (Salimans & Ho 2022): a student that samples in
    `student_steps` DDIM steps what the teacher samples in twice as many. The student is the
    teacher's network (plus the guidance input when guidance is distilled), initialized from its
    weights; the exported model is the teacher of the next round."""

    stage: Literal["distill"]
    out_dir: str
    teacher: str  # a DiffusionModel folder: a train.py export (base, tsr, ssr or an earlier round)
    vae: str  # the VAE folder the teacher was trained on (encodes the clips; checks data.latents)
    student_steps: int = param(ge=1)  # N; the teacher runs 2N (a distilled teacher must have steps: 2N)
    data: DataConfig
    teacher_weights: Literal["ema", "model"] = "ema"  # which weights of the teacher folder
    guidance: DistillGuidanceConfig = field(default_factory=DistillGuidanceConfig)
    caption_dropout: float = param(0.0, ge=0, le=1)  # share of captions replaced by the null text, for both
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        weights = self.guidance.weights
        if weights is not None and not 0 <= weights[0] <= weights[1]:
            raise ValueError(f"guidance.weights must be [low, high] with 0 <= low <= high, got {list(weights)}")


@dataclass
class VAELossConfig:
    kl_weight: float = param(1e-6, ge=0)
    l1_weight: float = param(1.0, ge=0)
    l2_weight: float = param(1.0, ge=0)
    discriminator_start: int | None = param(None, ge=0)  # step after which the GAN losses count; None: no GAN
    discriminator_weight: float = param(0.1, ge=0)


@dataclass
class VAETrainConfig:
    stage: Literal["vae"]
    model: str  # a VAE model config (YAML), e.g. configs/vae/tiny.yaml
    out_dir: str
    data: DataConfig
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.data.latents:
            raise ValueError("data.latents: the VAE trains on pixels")
        if self.train.gradient_checkpointing:
            raise ValueError("train.gradient_checkpointing: the VAE has no checkpointed blocks")
        if self.train.compile:
            raise ValueError("train.compile: compiles a backbone's blocks; the VAE stage has none")
        if self.loss.discriminator_start is not None and self.optim.zero == 3:
            raise ValueError("loss.discriminator_start: the GAN losses need optim.zero <= 2 (its generator term "
                             "reads the discriminator's weights whole)")
