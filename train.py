"""One entry for every trainable stage, chosen by the config's `stage`:

    python train.py configs/vae/train_tiny.yaml [key=value ...]        one process
    torchrun --nproc_per_node 2 train.py configs/base/tiny.yaml         several, one node
    deepspeed --num_gpus 8 [--hostfile H] train.py configs/base/xl.yaml several nodes

One loop (`train`, below) on DeepSpeed ZeRO for every stage; what differs between them lives in
`dit_video.training.stages`: `vae` (the video autoencoder and its discriminator, on pixels) and
`base`, `tsr`, `ssr` (a diffusion backbone on VAE latents: buckets of native sizes, joint
image-video batches, caption dropout, cascade conditioning with augmentation) and `distill` (a
round of progressive distillation: a student that samples in N steps what its teacher, a trained
model folder, samples in 2N, guidance optionally distilled in). Around it: EMA,
checkpoints that resume exactly, a non-finite guard, SIGTERM handling, the run log and the export.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dit_video.cli import UsageError, config_arguments, exits_cleanly
from dit_video.config import ConfigError, load_config, read_yaml, save_config
from dit_video.data.loader import NoUsableData
from dit_video.training.checkpoint import check_resumable, complete_checkpoints, ensure_universal, read_trainer_state
from dit_video.training.checkpoint import load as checkpoint_load
from dit_video.training.checkpoint import save as checkpoint_save
from dit_video.training.config import DiffusionTrainConfig, DistillTrainConfig, VAETrainConfig
from dit_video.training.ema import EMA
from dit_video.training.engine import build_engine, deepspeed_config, device_for, setup_distributed
from dit_video.training.log import RunLog
from dit_video.training.stages import TrainRun, build_stage, preflight


STAGES = {"vae": VAETrainConfig, "base": DiffusionTrainConfig, "tsr": DiffusionTrainConfig,
          "ssr": DiffusionTrainConfig, "distill": DistillTrainConfig}


def load_train_config(path: str, overrides: list[str]) -> TrainRun:
    stage = read_yaml(path).get("stage")
    for item in overrides:
        if item.startswith("stage="):
            stage = item.partition("=")[2]
    if stage not in STAGES:
        raise ConfigError(f"{path}: stage: expected one of {', '.join(map(repr, STAGES))}, got {stage!r}")
    return load_config(STAGES[stage], path, overrides)


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


def train(cfg: TrainRun) -> dict:
    """The loop of every stage; returns the last logged metrics (on rank 0)."""
    rank, world, local_rank = setup_distributed()
    device = device_for(local_rank)
    out, checkpoints = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process
    generator = torch.Generator(device).manual_seed(cfg.train.seed * 1_000_003 + rank)  # per-process noise
    stage = build_stage(cfg, rank, world, device, generator)
    loader = stage.loader

    found = complete_checkpoints(checkpoints)
    resume = found[-1] if found else None
    state = read_trainer_state(resume) if resume else None
    if resume is not None:
        check_resumable(out, cfg, state)
    same_world = state is None or state["world"] == world
    if resume is not None and not same_world:
        try:
            ensure_universal(resume, rank)
        except RuntimeError as e:
            raise Stop(f"{e}; or resume with the {state['world']} processes that wrote it") from None
    micro = (cfg.data.buckets or cfg.data.image_buckets)[0].batch_size
    try:
        ds_config = deepspeed_config(cfg.optim, micro, cfg.train.steps, device, load_universal=not same_world)
    except ValueError as e:
        raise UsageError(str(e)) from None
    engine = build_engine(stage.model, ds_config)
    ema = EMA(engine.module, cfg.train.ema_decay, rank)
    step, nonfinite_total = 0, 0
    if resume is not None:
        try:
            ema_state = checkpoint_load(resume, engine, rank, generator, same_world)
            if ema_state is not None:
                ema.load_state_dict(ema_state)
            loader.load_state_dict(state["data"])  # with another world size the batches split differently
        except (RuntimeError, ValueError, KeyError) as e:  # e.g. a backbone file edited since
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"cannot resume from {resume}: {reason}") from None
        step, nonfinite_total = state["step"], state["nonfinite"]
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    log = RunLog(out, rank, cfg.train.steps, step, cfg.train.tensorboard)
    if resume is not None:
        log.message(f"resumed from {resume} at step {step}" + ("" if same_world else
                    f" (written by {state['world']} processes, now {world}: universal checkpoint)"))
    log.message(loader.sampler.describe(cfg.optim.grad_accum))
    if stage.compiled_blocks:
        log.message(f"torch.compile: {stage.compiled_blocks} backbone blocks, compiled at the first step of each shape")
    term, batches = TermSignal(), iter(loader)
    nonfinite_run, metrics, reported = 0, {}, set()

    def save() -> None:
        trainer_state = {"step": step, "world": world, "data": loader.state_dict(), "nonfinite": nonfinite_total}
        checkpoint_save(checkpoints, step, engine, rank, trainer_state, generator, ema.state_dict(),
                        cfg.train.keep_checkpoints)

    while step < cfg.train.steps:
        results, samples = [], 0
        while len(results) < cfg.optim.grad_accum:
            try:
                batch = next(batches)
            except NoUsableData as e:
                raise UsageError(f"data: {e}") from None
            result = engine(**stage.inputs(batch, step))
            loss = result["loss"]
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
            results.append(torch.stack([v.detach().float() for v in result.values()]))
            samples += len(batch["captions"]) * world
        step += 1
        ema.update()
        mean = torch.stack(results).mean(0)  # loss and the stage's metrics, averaged over the processes
        dist.all_reduce(mean)
        stop = torch.tensor([float(term.received)], device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        metrics = {**dict(zip(result, (mean / world).tolist())), "lr": engine.get_lr()[0],
                   "nonfinite": nonfinite_total, "skipped_files": len(loader.skipped)}
        log.step(step, samples, metrics, write=step % cfg.train.log_every == 0 or step == cfg.train.steps)
        for path, reason in loader.skipped.items():
            if path not in reported:
                reported.add(path)
                log.message(f"skipped {reason}")
        note = stage.after_step(step, ema, out)
        if note:
            log.message(note)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop.item():
            save()
        if stop.item():
            log.message(f"SIGTERM: checkpoint of step {step} written, exiting")
            break
    log.close()
    if step == cfg.train.steps:
        path = stage.export(out, engine, ema)
        if path is not None:
            log.message(f"exported {path}")
    dist.destroy_process_group()
    return {"step": step, **metrics}


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    argv = launcher_arguments(sys.argv[1:] if argv is None else argv)
    cfg = load_train_config(*config_arguments(argv, "train.py", __doc__.split("\n\n")[0]))
    preflight(cfg)
    try:
        train(cfg)
    except Stop as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
