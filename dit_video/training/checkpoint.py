"""Checkpoints that are complete or absent.

    <out_dir>/checkpoints/step_00000100/
        ds/                     DeepSpeed's model, optimizer and LR-schedule states (every rank)
        universal/              the same, converted for another number of processes (on demand)
        trainer.json            step, world size, data position, counters (rank 0)
        rng_rank{r}.safetensors each process's random states
        ema.safetensors         the fp32 EMA weights (rank 0)
        COMPLETE                written last, by rank 0, once every rank has finished

A checkpoint is written under `step_N.tmp/`, synced, marked COMPLETE only after a barrier
that every rank reaches when its own files are on disk, then renamed into place; only then are
older ones pruned (the newest `keep` stay). DeepSpeed's `latest` file is not used: it is
written before all ranks finish. A run killed at any moment thus leaves the last complete
checkpoint loadable, and resume reads only directories that carry COMPLETE. Before anything is
loaded, `check_resumable` refuses a config that changed what the checkpoint depends on.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..cli import UsageError
from ..config import ConfigError, config_differences, load_config, to_dict
from ..files import write_text_atomic

STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: p.name)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's random states: torch (CPU and CUDA), the loop's generator and Python's."""
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    return tensors, {"python": json.dumps([version, list(state), gauss])}


def set_rng_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], generator: torch.Generator) -> None:
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    version, state, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(state), gauss))


def save(root: Path, step: int, engine, rank: int, trainer_state: dict, generator: torch.Generator,
         ema_state: dict[str, torch.Tensor] | None, keep: int) -> Path:
    """Write the checkpoint of `step` on every rank (a collective call); returns its path."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="ds", client_state={}, save_latest=False)
    tensors, metadata = rng_state(generator)
    save_file(tensors, tmp / f"rng_rank{rank}.safetensors", metadata=metadata)
    if rank == 0:
        write_text_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=2) + "\n")
        if ema_state is not None:
            save_file(ema_state, tmp / "ema.safetensors")
    dist.barrier()  # every rank's files are written
    if rank == 0:
        _fsync_tree(tmp)
        (tmp / "COMPLETE").write_text(f"{step}\n")
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer.json").read_text())


# What a resumed run must keep: the model's shape, what feeds it, the data stream and the ZeRO
# layout its checkpoint was written in. Steps, intervals, the learning rate and the like may change.
FIXED_ON_RESUME = ("stage", "model", "vae", "teacher", "backbone", "text", "cascade", "data.videos", "data.latents",
                   "data.images", "train.seed", "optim.zero", "optim.deepspeed")


def check_resumable(out: Path, cfg, state: dict) -> None:
    """UsageError, before anything is loaded, if the run in `out` cannot go on under `cfg`."""
    if state["step"] > cfg.train.steps:
        raise UsageError(f"{out}: its newest checkpoint is at step {state['step']}, past train.steps="
                         f"{cfg.train.steps}: raise train.steps to go on, or give a new out_dir")
    saved = out / "config.yaml"
    try:
        before = load_config(type(cfg), saved)
    except ConfigError as e:
        raise UsageError(f"{saved}: the run's config no longer loads ({e}): give a new out_dir") from None
    for key in FIXED_ON_RESUME:
        was, now = (_dotted(to_dict(c), key) for c in (before, cfg))
        if was != now:
            if isinstance(was, dict) and isinstance(now, dict):  # name the first key that differs
                inner, (was, now) = next(iter(config_differences(was, now).items()))
                key = f"{key}.{inner}"
            raise UsageError(f"{out}: the run started with {key}={was!r}, now {now!r}; a resumed run keeps its "
                             f"model, data sources, seed and ZeRO layout: give a new out_dir to change them")


def _dotted(data: dict, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def ensure_universal(path: Path, rank: int) -> None:
    """Convert the DeepSpeed states of checkpoint `path` for another number of processes, once,
    with DeepSpeed's own converter (rank 0 converts; all ranks wait)."""
    target = path / "universal"
    if rank == 0 and not target.is_dir():
        tmp = path / "universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                 str(path / "ds"), "--output_folder", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{path}: converting to a universal checkpoint failed ({tail[0]}); to convert by "
                               f"hand: python -m deepspeed.checkpoint.ds_to_universal --input_folder {path / 'ds'} "
                               f"--output_folder {target}")
        tmp.rename(target)
    dist.barrier()


def load(path: Path, engine, rank: int, generator: torch.Generator, same_world: bool) -> dict | None:
    """Restore the engine (model, optimizer, LR schedule) and, with the same number of processes,
    this rank's random states. Returns the EMA weights on rank 0, else None."""
    tag = "ds" if same_world else "universal"
    loaded, _ = engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load its states from {tag}/")
    if same_world:
        rng_file = path / f"rng_rank{rank}.safetensors"
        from safetensors import safe_open

        with safe_open(rng_file, "pt") as f:
            metadata = f.metadata()
        set_rng_state(load_file(rng_file), metadata, generator)
    ema_file = path / "ema.safetensors"
    return load_file(ema_file) if rank == 0 and ema_file.is_file() else None
