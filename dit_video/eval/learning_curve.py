"""Learning curves of base-model runs: the loss, and for every checkpoint a run kept, how well its
model uses each word of the caption, so that a change to the recipe shows within a few hundred
steps whether it helps:

    python -m dit_video.eval.learning_curve runs/tiny/base --latents data/pipeline/val_latents
    python -m dit_video.eval.learning_curve runs/a runs/b --latents ... --prompts 36 --out outputs/curves.png

For each complete checkpoint of a run (`<run>/checkpoints/step_N/`, its EMA weights; a run keeps
the newest `train.keep_checkpoints`, so set it high enough for the curve wanted):

- identification: the caption probe's attribute identification on held-out latents
  (caption_probe.attribute_identification), averaged over the noise levels: the share of clips
  whose denoising error is lowest under their own shape, color, direction or background.
- adherence (`--prompts N`): N prompts spread over the domain, sampled by the base stage alone
  (DDIM, classifier-free guidance), decoded by the run's VAE and judged by the detector
  (adherence.detect): what the pipeline's first stage draws, at its own size.

The figures of each checkpoint are kept in `<run>/curve.json` and computed once (again only when
the settings change), so running the command again while the run trains adds the new checkpoints
only. The plot (`<run>/curve.png`, or `--out`) shows the training loss and each figure per
attribute against the step, one line style per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from vae import VideoVAE

from ..cli import UsageError, check_output_path, exits_cleanly
from ..config import ConfigError, load_config
from ..diffusion import GuidanceConfig, SamplerConfig
from ..files import atomic_path, write_text_atomic
from ..models.pretrained import DiffusionModel, DiffusionModelConfig
from ..pipeline import Pipeline, PipelineConfig, StageConfig
from ..text import build_text_encoder
from ..training.checkpoint import complete_checkpoints
from ..training.config import DiffusionTrainConfig
from .adherence import ATTRIBUTES, adherence, attribute_values, detect_batch
from .caption_probe import attribute_identification, model_caption_denoiser, probe_clips
from .evaluate import all_prompts, spread

CHANCE = {a: 1 / len(attribute_values(a)) for a in ATTRIBUTES}


def run_model(run: Path) -> tuple[DiffusionTrainConfig, DiffusionModelConfig, VideoVAE]:
    """A base run's config, the config of the model its checkpoints hold, and its VAE."""
    from ..training.stages import backbone_config  # the training side: DeepSpeed's imports

    path = run / "config.yaml"
    if not path.is_file():
        raise UsageError(f"{run}: not a training run (no config.yaml)")
    cfg = load_config(DiffusionTrainConfig, str(path), [])
    if cfg.stage != "base":
        raise UsageError(f"{run}: a {cfg.stage} run; learning curves take base runs (the probe reads the caption)")
    vae = VideoVAE.from_pretrained(cfg.vae).eval().requires_grad_(False)
    backbone = backbone_config(cfg, vae, build_text_encoder(cfg.text).dim)
    return cfg, DiffusionModelConfig("base", backbone, cfg.text, cfg.diffusion), vae


def snapshots(run: Path) -> list[tuple[int, Path]]:
    """(step, EMA weights file) of every complete checkpoint, by step (the last step always has
    one, and the export holds the same weights)."""
    return [(int(folder.name.split("_")[1]), folder / "ema.safetensors")
            for folder in complete_checkpoints(run / "checkpoints") if (folder / "ema.safetensors").is_file()]


def losses(run: Path) -> list[tuple[int, float]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "loss" in record:
            records.append((record["step"], record["loss"]))
    return records


@torch.no_grad()
def figures(model: DiffusionModel, vae: VideoVAE, cfg: DiffusionTrainConfig, settings: dict,
            latents: torch.Tensor, captions: list[str]) -> dict:
    """The figures of one snapshot (see the module docstring)."""
    identified = attribute_identification(model_caption_denoiser(model), latents, captions, settings["logsnr"],
                                          torch.Generator().manual_seed(settings["seed"]))
    out = {"identification": {a: sum(r["accuracy"][a] for r in identified) / len(identified) for a in ATTRIBUTES},
           "identification_rows": identified}
    if settings["prompts"]:
        bucket = cfg.data.buckets[0]
        pipe = Pipeline(PipelineConfig(vae="", stages=[StageConfig(model="base")], frames=bucket.frames,
                                       height=bucket.height, width=bucket.width,
                                       sampler=SamplerConfig(steps=settings["steps"]),
                                       guidance=GuidanceConfig(weight=settings["guidance"])), vae, [model])
        prompts = [p["caption"] for p in spread(all_prompts(), settings["prompts"])]
        videos = pipe.generate(prompts, seed=settings["seed"], progress=False)
        out["adherence"] = {a: v for a, v in adherence(detect_batch(videos), prompts).items() if a in ATTRIBUTES}
    return out


def curve(run: Path, settings: dict, latents: torch.Tensor, captions: list[str]) -> dict:
    """`<run>/curve.json`, brought up to date: {"settings", "points": {step: figures}}."""
    path = run / "curve.json"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    points = cached.get("points", {}) if cached.get("settings") == settings else {}
    todo = [(step, file) for step, file in snapshots(run) if str(step) not in points]
    if todo:
        cfg, model_cfg, vae = run_model(run)
        model = DiffusionModel(model_cfg).eval().requires_grad_(False)
        for step, file in tqdm(todo, desc=f"{run.name}: checkpoints"):
            state = load_file(file)
            missing = model.trained_state().keys() - state.keys()
            if missing:
                raise UsageError(f"{file}: does not fit the run's model (missing {sorted(missing)[:3]})")
            model.load_state_dict(state, strict=False)
            points[str(step)] = figures(model, vae, cfg, settings, latents, captions)
            write_text_atomic(path, json.dumps({"settings": settings, "points": points}, indent=1) + "\n")
    return {"settings": settings, "points": points}


def plot(runs: dict[str, dict], loss_curves: dict[str, list], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["identification"] + (["adherence"] if any("adherence" in p for c in runs.values()
                                                       for p in c["points"].values()) else [])
    fig, axes = plt.subplots(1 + len(kinds), len(ATTRIBUTES), figsize=(3.2 * len(ATTRIBUTES), 2.8 * (1 + len(kinds))),
                             dpi=100, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for i, (name, data) in enumerate(runs.items()):
        style = styles[i % len(styles)]
        color = f"C{i}"
        steps_loss = loss_curves[name]
        if steps_loss:
            steps, values = zip(*steps_loss)
            window = max(1, len(values) // 40)
            smooth = [sum(values[max(0, j - window + 1):j + 1]) / len(values[max(0, j - window + 1):j + 1])
                      for j in range(len(values))]
            axes[0][0].plot(steps, smooth, style, color=color, label=name)
        points = sorted((int(s), p) for s, p in data["points"].items())
        for row, kind in enumerate(kinds, start=1):
            for col, attribute in enumerate(ATTRIBUTES):
                xs = [s for s, p in points if kind in p]
                ys = [100 * p[kind][attribute] for s, p in points if kind in p]
                axes[row][col].plot(xs, ys, style, color=color, marker="o", markersize=3, label=name)
    axes[0][0].set(title="training loss (smoothed)", xlabel="step")
    axes[0][0].legend(fontsize=7)
    for col in range(1, len(ATTRIBUTES)):
        axes[0][col].axis("off")
    titles = {"identification": "probe: identified", "adherence": "base samples: adherence"}
    for row, kind in enumerate(kinds, start=1):
        for col, attribute in enumerate(ATTRIBUTES):
            ax = axes[row][col]
            ax.axhline(100 * CHANCE[attribute], color="gray", lw=0.8, ls=":")
            ax.set(title=f"{titles[kind]}: {attribute}", xlabel="step", ylim=(0, 102))
            ax.set_ylabel("%")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_video.eval.learning_curve",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="base-stage run folders (train.py's out_dir)")
    parser.add_argument("--latents", required=True, help="a latent cache of held-out synthetic clips at the runs' size")
    parser.add_argument("--clips", type=int, default=128, help="probe clips spread over the cache (default: %(default)s)")
    parser.add_argument("--logsnr", type=float, nargs="+", default=[-6.0, -4.0, -2.0],
                        help="probe noise levels (default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=0, help="also sample N prompts and judge them (default: none)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps of those samples (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0, help="their guidance weight (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="the plot (default: <first run>/curve.png)")
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.clips < 1 or args.prompts < 0 or args.steps < 1 or args.guidance < 0:
        raise UsageError("need --clips >= 1, --prompts >= 0, --steps >= 1 and --guidance >= 0")
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not (run / "config.yaml").is_file():
            raise UsageError(f"{run}: not a training run (no config.yaml)")
    out = Path(args.out) if args.out else runs[0] / "curve.png"
    check_output_path(out)
    try:
        latents, captions = probe_clips(args.latents, args.clips)
    except ValueError as e:
        raise UsageError(str(e)) from None
    settings = {"latents": str(args.latents), "clips": args.clips, "logsnr": args.logsnr, "prompts": args.prompts,
                "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
    curves, loss_curves = {}, {}
    for run in runs:
        try:
            curves[str(run)] = curve(run, settings, latents, captions)
        except (ConfigError, ValueError) as e:
            raise UsageError(f"{run}: {e}") from None
        loss_curves[str(run)] = losses(run)
    plot(curves, loss_curves, out)
    for name, data in curves.items():
        print(f"{name}:")
        for step, p in sorted((int(s), p) for s, p in data["points"].items()):
            cells = "  ".join(f"{a} {100 * p['identification'][a]:3.0f}%" for a in ATTRIBUTES)
            extra = "" if "adherence" not in p else "  | samples: " + "  ".join(
                f"{a} {100 * p['adherence'][a]:3.0f}%" for a in ATTRIBUTES)
            print(f"  step {step:6d}  probe: {cells}{extra}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
