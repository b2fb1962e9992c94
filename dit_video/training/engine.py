"""DeepSpeed as the engine of every run: the process group, the DeepSpeed config built from a ready
ZeRO file in configs/deepspeed/ plus the run's optimization settings, and the engine itself.

One code path for `python train.py` (one process), `torchrun --nproc_per_node N train.py` and
`deepspeed --num_gpus N train.py`: the launchers set RANK / WORLD_SIZE / LOCAL_RANK, and a plain
`python` run gets those of a world of one.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..config import param

ROOT = Path(__file__).resolve().parents[2]
ZERO_FILES = {stage: ROOT / f"configs/deepspeed/zero{stage}.json" for stage in range(4)}


@dataclass
class OptimConfig:
    """The optimization settings of a run; the ZeRO stage comes from a ready file."""

    zero: int = param(2, ge=0, le=3)  # picks configs/deepspeed/zero{N}.json
    deepspeed: str | None = None  # or a DeepSpeed JSON of your own (its zero_optimization is used)
    lr: float = param(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = param(0.0, ge=0)
    warmup_steps: int = param(0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warmup
    min_lr_ratio: float = param(0.1, ge=0, le=1)  # cosine: the final lr over lr
    grad_accum: int = param(1, ge=1)  # micro-batches per optimizer step
    grad_clip: float = param(1.0, ge=0)  # 0: no clipping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU

    def __post_init__(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def setup_distributed() -> tuple[int, int, int]:
    """Join the process group (gloo on CPU, nccl on CUDA): (rank, world size, local rank)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def precision(cfg: OptimConfig, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError("optim.precision: bf16 needs a CUDA device; use fp32 (or auto) on CPU")
    return cfg.precision


def zero_section(cfg: OptimConfig) -> dict:
    """The ZeRO section of the run's DeepSpeed file (`optim.deepspeed`, else the ready file of
    `optim.zero`); ValueError if the file cannot be read."""
    path = Path(cfg.deepspeed) if cfg.deepspeed else ZERO_FILES[cfg.zero]
    try:
        ready = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"optim.deepspeed: cannot read {path} ({e.__class__.__name__}: {e})") from None
    return ready.get("zero_optimization", {"stage": cfg.zero})


def deepspeed_config(cfg: OptimConfig, micro_batch: int, total_steps: int, device: torch.device,
                     load_universal: bool = False) -> dict:
    """The DeepSpeed config of a run: the ZeRO section of the chosen file, and everything else
    from `cfg`. `micro_batch` is per process; with buckets of several batch sizes DeepSpeed's own
    batch numbers only label its logs, since the loss is averaged by the loop."""
    zero = zero_section(cfg)
    if device.type != "cuda":  # overlapping communication needs CUDA streams
        zero = {k: v for k, v in zero.items() if k != "overlap_comm"}
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.lr_schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, warmup + 1), "warmup_num_steps": warmup,
            "warmup_min_ratio": 0.0, "cos_min_ratio": cfg.min_lr_ratio, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": max(warmup, 1),
            "warmup_type": "linear"}} if warmup else None
    ds = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        # torch's AdamW: identical math on CPU and GPU, no compiled op to build
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "betas": list(cfg.betas),
                                                   "weight_decay": cfg.weight_decay, "torch_adam": True}},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision(cfg, device) == "bf16"},
        "steps_per_print": 10**12,  # the loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if scheduler:
        ds["scheduler"] = scheduler
    return ds


def build_engine(model: nn.Module, ds_config: dict):
    """The DeepSpeed engine of `model`'s trainable parameters (frozen ones stay out of the
    optimizer). The module is marked for DeepSpeed's universal checkpoints: plain data
    parallelism has no tensor-parallel patterns to declare, so the info is empty."""
    import deepspeed

    model.universal_checkpoint_info = {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    return engine
