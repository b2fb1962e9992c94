"""Backbone A/B (or A/B/C...) experiments: the same training run for every arm but the backbone,
then the same evaluation, in one report.

    python -m dit_video.eval.ab configs/ab/tiny.yaml [key=value ...]

Every arm trains from one training config (`train`, with `overrides`): the same data, steps,
seed, batch and schedule; only its `backbone` differs (and an arm's own `overrides`, which the
report lists). With `match_parameters`, each arm's width is set so that its parameter count is the
closest to the first arm's. Each arm is a `train.py` run under `<runs_dir>/<arm>/`; its exported
EMA model is then evaluated the same way:

- samples from the same prompts and seeds, through `eval.pipeline` with the arm's model in place
  of the stage of its kind (`eval.cascade: false`: the arm's base stage alone), judged by the
  detector of the synthetic domain (dit_video.eval.adherence);
- with a latent cache of captioned clips (`eval.latents`), the denoising error at fixed noise
  levels and fixed noise, how much each caption attribute lowers it (the caption probe), and the
  probe's attribute identification on every checkpoint the arm kept: a learning curve, so that
  the report shows which design learns motion first, not only where each ended.

Adherence figures carry 95% intervals, and the report says which arms' direction intervals
separate (a difference the number of prompts and seeds resolves) and which overlap.

The report folder (`out_dir`) gets `report.md` (the summary), `report.json`, `loss.png` (training
loss against steps and time, and the denoising error against the noise level), `curve.png` (the
learning curves), `samples.png` (the same prompts, one row per arm) and `samples/<arm>.mp4` (a
grid of the arm's sample videos), and `arms/<arm>.yaml`, the training config each arm ran with. Interrupted (Ctrl-C, SIGTERM, a crash),
the same command resumes: finished arms and evaluations are kept, an unfinished run resumes from
its last checkpoint. Changing what an arm trains with is refused; use a new `out_dir`.

`processes: N` trains each arm under torchrun with N processes on this machine (one per GPU;
gloo on CPU): the global batch is then N times the buckets' batch_size, so an arm resumes only
with the number of processes it started with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cli import UsageError, check_output_dir, config_arguments, exits_cleanly, parse_device
from ..config import ConfigError, config_differences, load_config, param, read_yaml, save_config, to_dict
from ..data.looks import tile, to_uint8
from ..data.video import write_video
from ..diffusion import SamplerConfig
from ..files import atomic_path, sha256_file, write_text_atomic
from ..models.flops import count_flops
from ..models.pretrained import DiffusionModel
from ..models.registry import WIDTH_KEYS, backbone_parameters, match_parameters
from ..pipeline import Pipeline
from ..system import machine_name
from ..training.checkpoint import complete_checkpoints, read_trainer_state
from ..training.config import DiffusionTrainConfig
from .adherence import ATTRIBUTES, adherence_table
from .caption_probe import caption_reliance, model_caption_denoiser, probe_clips
from .evaluate import all_prompts, extension_figures, generate_all, spread
from .learning_curve import curve as probe_curve
from .learning_curve import plot as plot_curves

ROOT = Path(__file__).resolve().parents[2]  # where train.py is
GRID_FILE = "ab_grid.pt"  # an arm's grid videos, in its run folder: samples.png is drawn from them


@dataclass
class ArmConfig:
    name: str
    backbone: str | dict[str, Any]  # a backbone config: YAML path or mapping
    overrides: list[str] = field(default_factory=list)  # key=value for this arm's training only


@dataclass
class ABEvalConfig:
    pipeline: str  # a pipeline folder whose stage of the arms' kind the arm's model replaces
    cascade: bool = True  # False: the arm's base stage alone, at its own size
    prompts: int = param(36, ge=1)  # spread over every caption of the synthetic domain
    seeds: int = param(1, ge=1)
    grid: int = param(6, ge=1)  # prompts in the sample grids, spread over those above
    seed: int = 0  # of the grid's videos
    batch: int = param(12, ge=1)  # videos per pipeline call
    extension_prompts: int = param(0, ge=0)  # > 0: extension figures (boundary jump) on this many prompts
    sampler: SamplerConfig | None = None  # None: the pipeline's
    latents: str | None = None  # a latent cache for the denoising error and the caption probe
    probe_clips: int = param(64, ge=1)
    probe_logsnr: list[float] = field(default_factory=lambda: [-4.0, -2.0, 0.0, 2.0])
    # the learning curve's probe (every checkpoint an arm kept): low SNR, where layout and motion
    # are decided and the caption is all a model has to go on
    curve_logsnr: list[float] = field(default_factory=lambda: [-6.0, -4.0, -2.0])
    device: str = "auto"  # auto: cuda when there is one


@dataclass
class ABConfig:
    train: str  # the training config every arm shares (a base, tsr or ssr stage)
    arms: list[ArmConfig]
    eval: ABEvalConfig
    out_dir: str  # the report
    runs_dir: str | None = None  # the arms' training runs; default <out_dir>/runs
    overrides: list[str] = field(default_factory=list)  # key=value applied to `train` for every arm
    match_parameters: bool = True  # set each arm's width to the first arm's parameter count
    processes: int = param(1, ge=1)  # train.py processes per arm (torchrun on this machine when > 1)

    def __post_init__(self):
        names = [arm.name for arm in self.arms]
        if len(names) < 2:
            raise ValueError("arms: give two arms at least")
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names must differ, got {names}")
        bad = [n for n in names if not n.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"arms: names are folder names: letters, digits, - and _ only, got {bad}")


# ---------------------------------------------------------------------------------------------
# The arms' training configs


def arm_configs(cfg: ABConfig) -> dict[str, DiffusionTrainConfig]:
    """Each arm's complete training config: the shared one, the arm's backbone (width-matched)
    and overrides, and its run folder. Raises UsageError / ConfigError in one line."""
    stage = read_yaml(cfg.train).get("stage")
    if stage not in ("base", "tsr", "ssr"):
        raise UsageError(f"{cfg.train}: an A/B trains diffusion backbones: stage must be base, tsr or ssr, got {stage!r}")
    runs = Path(cfg.runs_dir or Path(cfg.out_dir) / "runs")
    shared = load_config(DiffusionTrainConfig, cfg.train, cfg.overrides)
    implied = implied_channels(shared)
    configs, target = {}, None
    for arm in cfg.arms:
        source = arm.backbone if isinstance(arm.backbone, str) else f"arms: {arm.name}: backbone"
        backbone = {**(read_yaml(arm.backbone) if isinstance(arm.backbone, str) else arm.backbone), **implied}
        try:
            count = backbone_parameters(backbone)
            if cfg.match_parameters and target is not None:
                backbone = match_parameters(backbone, target)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None
        target = target or count
        overrides = [*cfg.overrides, *arm.overrides, f"out_dir={runs / arm.name}"]
        arm_cfg = load_config(DiffusionTrainConfig, cfg.train, overrides)
        configs[arm.name] = dataclasses.replace(arm_cfg, backbone=backbone)
    return configs


def implied_channels(cfg: DiffusionTrainConfig) -> dict[str, int]:
    """The backbone channels a run fills in (training.stages.backbone_config), read from the VAE's
    and the text encoder's configs without building either."""
    vae = read_yaml(Path(cfg.vae) / "config.yaml")
    if cfg.text.encoder == "t5":
        text_dim = read_yaml(Path(cfg.text.path) / "config.json").get("d_model")  # JSON is YAML
    else:
        text_dim = cfg.text.dim
    latent = vae.get("latent_channels", 4)
    return {"in_channels": latent, "text_dim": text_dim, "cond_channels": latent if cfg.cascade else 0}


def check_unchanged(path: Path, cfg: DiffusionTrainConfig) -> None:
    """UsageError if `path` holds another training config than `cfg`: the arm's run would resume
    under other settings. A key added to the config since the arm ran counts at its default."""
    if not path.exists():
        return
    try:
        before = load_config(type(cfg), path)
    except ConfigError as e:  # e.g. a key since removed or renamed
        raise UsageError(f"this experiment's arm config no longer loads ({e}): give a new out_dir, or delete "
                         f"the old one") from None
    changed = config_differences(before, cfg)
    if changed:
        key, (was, now) = next(iter(changed.items()))
        raise UsageError(f"{path}: this experiment ran with {key}={was!r}, now {now!r} "
                         f"({len(changed)} keys differ): give a new out_dir, or delete the old one")


# ---------------------------------------------------------------------------------------------
# Training


def finished_step(run: Path) -> int:
    """The step of the run's newest complete checkpoint (0 if none)."""
    found = complete_checkpoints(run / "checkpoints")
    return read_trainer_state(found[-1])["step"] if found else 0


def check_processes(run: Path, processes: int) -> None:
    """UsageError if the run's last checkpoint was written by another number of processes: the
    batch size is per process, so resuming would change the global batch."""
    found = complete_checkpoints(run / "checkpoints")
    world = read_trainer_state(found[-1])["world"] if found else processes
    if world != processes:
        raise UsageError(f"{run}: this arm trained with {world} processes, now {processes} (the global batch "
                         f"would change): set processes={world}, or give a new out_dir")


def train_arm(config_path: Path, run: Path, steps: int, processes: int = 1) -> None:
    """Run (or resume) one arm's training with train.py, under torchrun if `processes` > 1. A
    SIGTERM to this process is passed on to every train.py process (each then checkpoints and
    exits), and the experiment stops there, to be resumed."""
    if finished_step(run) >= steps and (run / "model/config.yaml").is_file():
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    child = subprocess.Popen([*launcher, str(ROOT / "train.py"), str(config_path)])
    stopped = []

    def forward(signum, frame):
        stopped.append(signum)
        for pid in (children(child.pid) if processes > 1 else []) or [child.pid]:
            os.kill(pid, signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0 and not stopped:
        raise SystemExit(f"error: {run.name}: train.py exited with {code}; run the same command to resume")
    if stopped or finished_step(run) < steps:
        raise SystemExit(f"stopped: {run.name} at step {finished_step(run)} of {steps}; run the same command to resume")


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux; [] elsewhere). torchrun's workers are signalled
    directly: torchrun itself, signalled, stops with a traceback of its own."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def training_figures(run: Path, cfg: DiffusionTrainConfig, model: DiffusionModel) -> dict:
    """Loss curve, throughput and memory of one arm, from its metrics log."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = records[1:] or records  # the first interval includes start-up
    samples_per_s = float(np.median([r["samples_per_s"] for r in steady]))
    tail = records[-max(1, len(records) // 5):]
    figures = {"steps": [r["step"] for r in records], "loss": [r["loss"] for r in records],
               "elapsed_s": [r.get("elapsed_s") for r in records],
               "final_loss": float(np.mean([r["loss"] for r in tail])), "samples_per_s": samples_per_s,
               "train_seconds": records[-1].get("elapsed_s"),
               "peak_memory_mib": max((r.get("peak_memory_mib") or 0) for r in records) or None,
               "parameters": sum(p.numel() for p in model.backbone.parameters()),
               "tokens_per_s": None, "train_tflops": None}
    buckets = cfg.data.buckets or cfg.data.image_buckets
    if len(buckets) == 1:  # one shape: tokens and FLOPs per sample are fixed
        vae = read_yaml(Path(cfg.vae) / "config.yaml")
        b = buckets[0]
        latent = (1 + (b.frames - 1) // vae["temporal_factor"], b.height // vae["spatial_factor"],
                  b.width // vae["spatial_factor"])
        patch = getattr(model.backbone.config, "patch", (1, 1, 1))
        tokens = int(np.prod([n // p for n, p in zip(latent, patch)]))
        flops = count_flops(model.backbone, (1, model.backbone.config.in_channels, *latent), cfg.text.max_length)
        figures["tokens_per_s"] = tokens * samples_per_s
        figures["train_tflops"] = 3 * flops * samples_per_s / 1e12  # backward = 2 forwards
    return figures


# ---------------------------------------------------------------------------------------------
# Evaluation


def arm_pipeline(reference: Pipeline, model: DiffusionModel, cascade: bool,
                 sampler: SamplerConfig | None = None) -> Pipeline:
    """`reference` with `model` in place of its stage of the same kind (or, cascade=False, that
    base stage alone at its size); `sampler`, if given, for every stage."""
    kinds = [s.model.config.stage for s in reference.stages]
    kind = model.config.stage
    if kind not in kinds:
        raise UsageError(f"eval.pipeline has no {kind} stage (it has {', '.join(kinds)}) for the arms to replace")
    index = kinds.index(kind)
    models, stages = [s.model for s in reference.stages], list(reference.config.stages)
    models[index] = model
    cfg = reference.config
    if not cascade:
        if kind != "base":
            raise UsageError(f"eval.cascade: false samples the arm's stage alone: only for base arms, not {kind}")
        frames, height, width = reference.stages[index].shape
        models, stages = [model], [stages[index]]
        cfg = dataclasses.replace(cfg, frames=frames, height=height, width=width)
    if sampler is not None:
        cfg = dataclasses.replace(cfg, sampler=sampler)
        stages = [dataclasses.replace(s, sampler=None) for s in stages]
    return Pipeline(dataclasses.replace(cfg, stages=stages), reference.vae, models, reference.root)


def evaluate_arm(model: DiffusionModel, reference: Pipeline, cfg: ABEvalConfig) -> tuple[dict, torch.Tensor]:
    """The arm's figures, and its grid videos [grid, 3, T, H, W]."""
    pipe = arm_pipeline(reference, model, cfg.cascade, cfg.sampler)
    prompts = spread(all_prompts(), cfg.prompts)
    detections, targets, _ = generate_all(pipe, prompts, cfg.seeds, cfg.batch)
    grid = [p["caption"] for p in spread(prompts, cfg.grid)]
    videos = pipe.generate(grid, seed=cfg.seed, progress=False)
    table = adherence_table(detections, targets)
    del table["results"]  # one row a video: not for the report
    figures = {"size": f"{pipe.frames}x{pipe.height}x{pipe.width}", "adherence": table, "grid_prompts": grid}
    if cfg.extension_prompts:
        figures["extension"] = extension_figures(pipe, spread(prompts, cfg.extension_prompts), cfg.batch)
    if cfg.latents and model.config.stage == "base":
        try:
            latents, captions = probe_clips(cfg.latents, cfg.probe_clips)
        except ValueError as e:
            raise UsageError(f"eval.latents: {e}") from None
        latents = latents.to(next(model.backbone.parameters()).device)
        rows = caption_reliance(model_caption_denoiser(model), latents, captions, cfg.probe_logsnr,
                                torch.Generator().manual_seed(0))
        figures["denoising"] = rows
    return figures, videos


# ---------------------------------------------------------------------------------------------
# The report


def write_grid_video(path: Path, videos: torch.Tensor, fps: float, columns: int = 3, gap: int = 2) -> None:
    """Videos [N, 3, T, H, W] tiled `columns` wide (fewer for fewer videos) into one mp4, white
    between tiles."""
    write_video(path, tile(videos.cpu().float(), columns, gap, fill=1.0), fps)


def plot_losses(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probe = all("denoising" in r["eval"] for r in results.values())
    fig, axes = plt.subplots(1, 3 if probe else 2, figsize=(13 if probe else 9, 3.6), dpi=100)
    for name, r in results.items():
        t = r["train"]
        smooth = _ema(t["loss"], 0.8)
        axes[0].plot(t["steps"], smooth, label=name)
        if all(e is not None for e in t["elapsed_s"]):
            axes[1].plot(np.array(t["elapsed_s"]) / 60, smooth, label=name)
        if probe:
            rows = r["eval"]["denoising"]
            axes[2].plot([row["logsnr"] for row in rows], [row["mse"]["true"] for row in rows], "o-", label=name)
    axes[0].set(xlabel="step", ylabel="training loss (smoothed)")
    axes[1].set(xlabel="training time, minutes", ylabel="training loss (smoothed)")
    if probe:
        axes[2].set(xlabel="log-SNR", ylabel="denoising MSE, fixed noise", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _ema(values: list[float], decay: float) -> list[float]:
    out, running = [], values[0]
    for v in values:
        running = decay * running + (1 - decay) * v
        out.append(running)
    return out


def plot_samples(path: Path, grids: dict[str, torch.Tensor], prompts: list[str], frames: int = 3) -> None:
    """One row per arm, one cell per prompt: `frames` frames of its video, first to last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grids)
    fig, axes = plt.subplots(len(names), len(prompts), figsize=(2.2 * len(prompts), 0.5 + 0.85 * len(names)),
                             dpi=110, squeeze=False)
    for r, name in enumerate(names):
        for c, video in enumerate(grids[name]):
            pixels = to_uint8(video)
            picks = np.linspace(0, len(pixels) - 1, frames).round().astype(int)
            strip = np.concatenate([np.pad(pixels[i], ((0, 0), (0, 1), (0, 0)), constant_values=255)
                                    for i in picks], 1)
            ax = axes[r][c]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompts[c].removeprefix("a ").replace(" on a ", "\non a "), fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def describe_backbone(backbone: dict) -> str:
    """The backbone's name and every key its arm sets, the width first: all that can tell two
    arms apart (the channels the run fills in are the same for every arm)."""
    width = WIDTH_KEYS[backbone["name"]]
    keys = [width] + [k for k in backbone if k not in (width, "name", "in_channels", "text_dim", "cond_channels")]
    return backbone["name"] + " (" + ", ".join(f"{k} {backbone[k]}" for k in keys if k in backbone) + ")"


def report_markdown(report: dict) -> str:
    arms, shared = report["arms"], report["shared"]
    first = next(iter(arms.values()))["train"]["parameters"]
    processes = "" if shared["processes"] == 1 else f"; {shared['processes']} processes"
    lines = [f"# Backbone A/B: {', '.join(arms)}", "",
             f"Every arm: the {shared['stage']} stage of `{report['train']}`, {shared['steps']} steps of batch "
             f"{shared['batch']} ({shared['buckets']}{processes}), seed {shared['seed']}, lr {shared['lr']}; evaluated with "
             f"`{report['eval']['pipeline']}`{'' if report['eval']['cascade'] else ' (the base stage alone)'} on "
             f"{report['eval']['prompts']} prompts x {report['eval']['seeds']} seeds. Trained and evaluated on "
             f"{report['machine']}. Reproduce: `{report['command']}`.", ""]
    if any(a["overrides"] for a in arms.values()):
        lines += ["Arm-specific settings: " + "; ".join(f"{n}: {', '.join(a['overrides'])}"
                                                         for n, a in arms.items() if a["overrides"]) + ".", ""]
    lines += ["## Training", "",
              "| arm | backbone | parameters | final loss | samples/s | tokens/s | TFLOP/s | peak memory | time |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, a in arms.items():
        t = a["train"]
        lines.append(f"| {name} | {describe_backbone(a['backbone'])} | {t['parameters'] / 1e6:.2f} M "
                     f"({100 * (t['parameters'] / first - 1):+.0f}%) | {t['final_loss']:.4f} | {t['samples_per_s']:.1f} | "
                     f"{_num(t['tokens_per_s'], '.0f')} | {_num(t['train_tflops'], '.4f')} | "
                     f"{_num(t['peak_memory_mib'], '.0f', ' MiB')} | {_num(t['train_seconds'] and t['train_seconds'] / 60, '.1f', ' min')} |")
    lines += ["", "Final loss: the mean of the last fifth of the logged training losses (random noise levels, so "
              "noisy). Throughput: the median over the log's intervals; TFLOP/s from the analytic FLOPs of a training "
              "step (3x the forward). Peak memory: the (first) training process's (CUDA: tensors; CPU: resident set).", "",
              "![training loss](loss.png)", ""]
    if all("denoising" in a["eval"] for a in arms.values()):
        levels = [row["logsnr"] for row in next(iter(arms.values()))["eval"]["denoising"]]
        lines += ["## Denoising error and use of the caption", "",
                  f"On {report['eval']['probe_clips']} clips of `{report['eval']['latents']}`, the same noise for every "
                  "arm: the MSE of x_hat at each log-SNR, then how much a caption with one attribute changed raises "
                  "it, averaged over the levels (0%: the arm ignores that attribute; see dit_video.eval.caption_probe).",
                  "", "| arm | " + " | ".join(f"MSE at {lv:g}" for lv in levels) + " | "
                  + " | ".join(f"wrong {a}" for a in ATTRIBUTES) + " |",
                  "| --- |" + " ---: |" * (len(levels) + len(ATTRIBUTES))]
        for name, a in arms.items():
            rows = a["eval"]["denoising"]
            mse = " | ".join(f"{row['mse']['true']:.4f}" for row in rows)
            use = " | ".join(f"{100 * np.mean([row['increase'][at] for row in rows]):+.1f}%" for at in ATTRIBUTES)
            lines.append(f"| {name} | {mse} | {use} |")
        lines.append("")
    lines += ["## Prompt adherence", "",
              f"Videos of {next(iter(arms.values()))['eval']['size']} judged by the detector of the synthetic domain: "
              "the share whose attribute matches the caption, and the object's temporal consistency (Consistency.score: about 0.9 for a rendered clip).", "",
              "| arm | " + " | ".join(ATTRIBUTES) + " | consistency |", "| --- |" + " ---: |" * (len(ATTRIBUTES) + 1)]
    for name, a in arms.items():
        table = a["eval"]["adherence"]
        acc = " | ".join(_percent(table["accuracy"][at], table["interval"][at]) for at in ATTRIBUTES)
        lines.append(f"| {name} | {acc} | {_num(table['consistency']['score'], '.3f')} |")
    lines += ["", "In brackets: the 95% (Wilson) interval over the videos. Direction: "
              + separation({name: a["eval"]["adherence"]["interval"]["direction"] for name, a in arms.items()}) + "."]
    if all("curve" in a["eval"] for a in arms.values()):
        steps = sorted({int(s) for a in arms.values() for s in a["eval"]["curve"]})
        lines += ["", "## Learning curves", "",
                  f"The caption probe on every checkpoint each arm kept (log-SNR {report['eval']['curve_logsnr']}): the "
                  "share of held-out clips whose denoising error is lowest under their own direction (chance 25%) "
                  "and shape (chance 33%). Which design learns motion faster shows here first.", "",
                  "| arm | attribute | " + " | ".join(f"step {s}" for s in steps) + " |",
                  "| --- | --- |" + " ---: |" * len(steps)]
        for name, a in arms.items():
            for attribute in ("direction", "shape"):
                cells = [a["eval"]["curve"].get(str(s), {}).get(attribute) for s in steps]
                lines.append(f"| {name} | {attribute} | " + " | ".join(_num(c and 100 * c, '.0f', '%') for c in cells) + " |")
        lines += ["", "![learning curves](curve.png)"]
    if all("extension" in a["eval"] for a in arms.values()):
        first_ext = next(iter(arms.values()))["eval"]["extension"]
        lines += ["", f"## Extension (one more chunk for each of {next(iter(first_ext.values()))['prompts']} prompts)", "",
                  "Boundary jump: the change across the boundary over the mean change between neighbouring frames "
                  "(1: no visible seam); `cut` is the reference, an unrelated video after the first chunk.", "",
                  "| arm | " + " | ".join(first_ext) + " |", "| --- |" + " ---: |" * len(first_ext)]
        for name, a in arms.items():
            ext = a["eval"]["extension"]
            lines.append(f"| {name} | " + " | ".join(f"{ext[m]['boundary_jump_mean']:.2f}" for m in first_ext) + " |")
    lines += ["", "## Samples", "", "The same prompts and seeds for every arm (first, middle and last frame):", "",
              "![samples](samples.png)", "",
              "Videos: " + ", ".join(f"[{name}](samples/{name}.mp4)" for name in arms) + ".", ""]
    return "\n".join(lines)


def _percent(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" + (f" ({100 * interval[0]:.0f}-{100 * interval[1]:.0f})" if interval else "")


def separation(intervals: dict[str, list[float] | None]) -> str:
    """Which arms' intervals do not overlap: a difference the evaluation resolves."""
    names = [n for n, i in intervals.items() if i]
    apart = [f"{a} {'above' if intervals[a][0] > intervals[b][1] else 'below'} {b}" for i, a in enumerate(names)
             for b in names[i + 1:] if intervals[a][0] > intervals[b][1] or intervals[b][0] > intervals[a][1]]
    if not apart:
        return "the intervals of all arms overlap: this evaluation does not tell them apart"
    return "the intervals separate for " + ", ".join(apart) + "; the other pairs overlap" * (
        len(apart) < len(names) * (len(names) - 1) // 2)


def _num(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


# ---------------------------------------------------------------------------------------------
# The experiment


def run(cfg: ABConfig, command: str) -> Path:
    out = Path(cfg.out_dir)
    check_output_dir(out)
    configs = arm_configs(cfg)
    arms_dir = out / "arms"
    for name, arm_cfg in configs.items():
        check_unchanged(arms_dir / f"{name}.yaml", arm_cfg)
        check_processes(Path(arm_cfg.out_dir), cfg.processes)
    device = parse_device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.eval.device == "auto"
                          else cfg.eval.device, "eval.device")
    reference = Pipeline.from_pretrained(cfg.eval.pipeline, device)
    shared = next(iter(configs.values()))
    if sha256_file(reference.root / reference.config.vae / "model.safetensors") != \
            sha256_file(Path(shared.vae) / "model.safetensors"):
        raise UsageError(f"eval.pipeline's VAE is not {shared.vae}, the one the arms train on: it would decode "
                         f"their latents wrongly")

    results = {}
    for i, (name, arm_cfg) in enumerate(configs.items()):
        run_dir = Path(arm_cfg.out_dir)
        config_path = arms_dir / f"{name}.yaml"
        if not config_path.exists():
            save_config(arm_cfg, config_path)
        params = backbone_parameters(arm_cfg.backbone)
        print(f"arm {i + 1}/{len(configs)}: {name}, {describe_backbone(arm_cfg.backbone)}, "
              f"{params / 1e6:.2f} M parameters -> {run_dir}", flush=True)
        train_arm(config_path, run_dir, arm_cfg.train.steps, cfg.processes)
        results[name] = cached_evaluation(name, arm_cfg, run_dir, reference, cfg.eval, out)

    report = {"train": cfg.train, "command": command, "machine": machine_name(device),
              "eval": to_dict(cfg.eval), "shared": shared_settings(shared, cfg.processes),
              "arms": {name: {"backbone": configs[name].backbone,
                              "overrides": next(a.overrides for a in cfg.arms if a.name == name), **r}
                       for name, r in results.items()}}
    plot_losses(out / "loss.png", {n: r for n, r in report["arms"].items()})
    grids = {name: torch.load(Path(configs[name].out_dir) / GRID_FILE) for name in configs}
    plot_samples(out / "samples.png", grids, next(iter(results.values()))["eval"]["grid_prompts"])
    if all("curve" in r["eval"] for r in results.values()):
        plot_curves({name: {"points": {step: {"identification": ident} for step, ident in r["eval"]["curve"].items()}}
                     for name, r in results.items()},
                    {name: list(zip(r["train"]["steps"], r["train"]["loss"])) for name, r in results.items()},
                    out / "curve.png")
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.md", report_markdown(report))
    return out / "report.md"


def cached_evaluation(name: str, arm_cfg: DiffusionTrainConfig, run_dir: Path, reference: Pipeline,
                      cfg: ABEvalConfig, out: Path) -> dict:
    """The arm's training and evaluation figures, computed once per exported model and settings."""
    cache = out / "arms" / f"{name}.json"
    key = {"model": sha256_file(run_dir / "model/ema.safetensors"), "eval": to_dict(cfg)}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["key"] == key and (run_dir / GRID_FILE).exists():
            return {"train": saved["train"], "eval": saved["eval"]}
    model = DiffusionModel.from_pretrained(run_dir / "model", "ema", reference.device)
    figures, videos = evaluate_arm(model, reference, cfg)
    if cfg.latents and model.config.stage == "base":
        figures["curve"] = learning_curve(run_dir, cfg)
    train = training_figures(run_dir, arm_cfg, model)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    write_grid_video(out / "samples" / f"{name}.mp4", videos, reference.config.fps)
    with atomic_path(run_dir / GRID_FILE) as tmp:
        torch.save(videos.to(torch.float16).cpu(), tmp)
    write_text_atomic(cache, json.dumps({"key": key, "train": train, "eval": figures}) + "\n")
    return {"train": train, "eval": figures}


def learning_curve(run_dir: Path, cfg: ABEvalConfig) -> dict[str, dict[str, float]]:
    """{step: {attribute: identified share}}: the caption probe on every checkpoint the arm kept
    (learning_curve.curve, cached in the run folder)."""
    latents, captions = probe_clips(cfg.latents, cfg.probe_clips)
    settings = {"latents": str(cfg.latents), "clips": cfg.probe_clips, "logsnr": cfg.curve_logsnr, "prompts": 0,
                "steps": 25, "guidance": 2.0, "seed": 0}
    points = probe_curve(run_dir, settings, latents, captions)["points"]
    return {step: points[step]["identification"] for step in sorted(points, key=int)}


def shared_settings(cfg: DiffusionTrainConfig, processes: int) -> dict:
    buckets = cfg.data.buckets or cfg.data.image_buckets
    return {"stage": cfg.stage, "steps": cfg.train.steps, "seed": cfg.train.seed, "lr": cfg.optim.lr,
            "processes": processes, "batch": " + ".join(str(b.batch_size * processes) for b in buckets),
            "buckets": ", ".join(f"{b.frames}x{b.height}x{b.width}" for b in buckets)}


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    path, overrides = config_arguments(argv, "python -m dit_video.eval.ab", __doc__.split("\n\n")[0])
    cfg = load_config(ABConfig, path, overrides)
    command = " ".join(["python -m dit_video.eval.ab", path, *overrides])
    print(f"wrote {run(cfg, command)}")


if __name__ == "__main__":
    main()
