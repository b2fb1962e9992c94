"""The performance report in one command: training-step throughput of the backbones against the
frame count (tokens/s, samples/s, analytic TFLOP/s, and MFU against the measured matmul peak on
CUDA), with factorized (dit) against full (dit3d) attention, the U-Net, and diffusers' Latte and
CogVideoX beside them as ratios of our step time to theirs; peak memory; the attention backends
at the model's shapes; and the sampling latency of a pipeline, stage by stage.

    python bench/report.py                            # CPU, fp32: a few minutes on 2 cores
    python bench/report.py --device cuda --dtype bf16
    python bench/report.py --quick                    # tiny sizes, one repeat: that it all runs

Writes bench/results/report_<device>.json (with --quick, report_quick_<device>.json), naming
the machine and its load average at the start and the end (on a CPU, other processes slow every
number down, most of all with as many threads as cores), and a PNG of the main numbers beside
it. The sizes, by device:

- cpu: width 192, depth 4, 3 heads, 16x16 latents, 4, 8 and 16 frames, median of 5 steps;
  attention at that model's shapes (3 heads of 64, 16 frames of 8x8 patches, 16 text tokens).
- cuda: width 768, depth 12, 12 heads, 32x32 latents, 4 to 32 frames, median of 10 steps;
  attention at dit-XL's shapes (bench/attention.py's defaults).
- --quick: width 32, depth 1, 2 heads, 8x8 latents, 2 and 4 frames, no peak memory (on CPU it
  takes a fresh process per case), and 2 sampler steps.

Every training arm runs PyTorch's scaled_dot_product_attention (ours with --attention sdpa, as
diffusers' do), in --dtype; sampling runs the pipeline in float32, as sample.py does. Without
diffusers installed the Latte and CogVideoX arms are left out, and the report says so. Each part
is the function of its own script (bench/backbones.py, bench/attention.py, bench/sampling.py),
which documents it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import attention, backbones, sampling  # noqa: E402
from bench.common import DTYPES, pyplot, result_path, save_figure, write_result  # noqa: E402
from dit_video.cli import UsageError, exits_cleanly  # noqa: E402
from dit_video.system import machine_name  # noqa: E402

PARTS = {"training": backbones, "attention": attention, "sampling": sampling}
SIZES = {  # each part's own arguments, by setting
    "cpu": {"training": "--width 192 --depth 4 --heads 3 --size 16 --frames 4 8 16 --repeats 5",
            "attention": "--frames 16 --patches 8 --heads 3 --head-dim 64 --text-len 16 --repeats 10",
            "sampling": "--repeats 3"},
    "cuda": {"training": "--width 768 --depth 12 --heads 12 --size 32 --frames 4 8 16 32 --repeats 10",
             "attention": "",
             "sampling": "--repeats 5"},
    "quick": {"training": "--width 32 --depth 1 --heads 2 --size 8 --frames 2 4 --repeats 1 --no-memory",
              "attention": "--frames 2 --patches 4 --heads 2 --head-dim 8 --text-len 4 --repeats 1",
              "sampling": "--steps 2 --repeats 1"},
}


def part_arguments(args) -> dict[str, argparse.Namespace]:
    """Each part's parsed and checked arguments (all checked before any work starts)."""
    sizes = SIZES["quick" if args.quick else args.device]
    extra = {"training": ["--device", args.device, "--dtype", args.dtype, "--attention", "sdpa", "--arms", *arms()],
             "attention": ["--device", args.device, "--dtype", args.dtype],
             "sampling": ["--device", args.device, "--model", args.model]}
    parts = {}
    for name, module in PARTS.items():
        parts[name] = module.parser().parse_args(sizes[name].split() + extra[name])
        module.check(parts[name])
    return parts


def arms() -> list[str]:
    if importlib.util.find_spec("diffusers") is None:
        print("diffusers is not installed: no Latte and CogVideoX arms (pip install -e '.[bench]')")
        return [a for a in backbones.ARMS if a not in backbones.THEIRS]
    return list(backbones.ARMS)


def plot(result: dict, path: Path) -> None:
    fig, axes = pyplot().subplots(2, 3, figsize=(16, 8.5), dpi=100)
    training = result["training"]
    rows = training["rows"]
    mfu = result["device"] == "cuda"
    backbones.draw_rows(axes[0, 0], rows, "tokens_per_s", "training tokens / s")
    backbones.draw_rows(axes[0, 1], rows, "mfu" if mfu else "tflops", "MFU" if mfu else "TFLOP/s (3x forward FLOPs)")
    if all(r["peak_mib"] is not None for r in rows):
        backbones.draw_rows(axes[0, 2], rows, "peak_mib", "peak memory of a step, MiB")
    else:
        axes[0, 2].set_axis_off()
    if training["ratios"]:
        backbones.draw_ratios(axes[1, 0], training["ratios"])
    else:
        axes[1, 0].set_axis_off()
    attention.draw(axes[1, 1], result["attention"])
    sampling.draw(axes[1, 2], result["sampling"])
    load = result["load_average"]
    fig.suptitle(f"Performance report: training {backbones.title(training)} "
                 f"(load average {load['start']:.1f} at the start, {load['end']:.1f} at the end)", fontsize=11)
    save_figure(fig, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="of training and attention (default: fp32 on cpu, "
                                                           "bf16 on cuda)")
    p.add_argument("--model", default=str(ROOT / "checkpoints/tiny"), help="the pipeline folder to sample with")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: that every part runs")
    p.add_argument("--out", help="JSON path (default bench/results/report_<device>.json); the PNG goes beside it")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> Path:
    args = parser().parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    out = result_path(args.out, "report_quick" if args.quick else "report", args.device)
    if out.suffix != ".json" or out.is_dir():
        raise UsageError(f"--out {out}: give a path ending in .json")
    parts = part_arguments(args)
    # the 1-minute load average: above the core count, other processes competed for the CPU
    result = {"machine": machine_name(args.device), "torch": torch.__version__, "device": args.device,
              "dtype": args.dtype, "quick": args.quick, "load_average": {"start": os.getloadavg()[0]}}
    for name, module in PARTS.items():
        print(f"\n== {name}")
        result[name] = module.run(parts[name])
    result["load_average"]["end"] = os.getloadavg()[0]
    print()
    write_result(result, str(out), "report", args.device)
    plot(result, out.with_suffix(".png"))
    return out


if __name__ == "__main__":
    main()
