"""Sampling latency of a pipeline folder, stage by stage: text encoding, each diffusion stage
(base, tsr, ssr) with its steps, time per step and network evaluations, and the VAE decode;
medians of --repeats generations after a warm-up one.

    python bench/sampling.py                                  # checkpoints/tiny with its own settings
    python bench/sampling.py --model DIR --device cuda --steps 50 --batch 4

The times are taken on the pipeline's own code path, `Pipeline.generate`: while a generation is
measured, the calls it makes are wrapped on that pipeline object with a timer (each stage
model's `encode_text`, each stage's sampling, the VAE's `decode`) and a forward hook counts each
backbone's evaluations. A stage's diffusion time is its sampling less its text encoding; the
parts add up to a little less than the total (the rest is glue: generators, the final clamp).
The pipeline samples in float32 whatever --dtype the other benchmarks use, as sample.py does.
Prints a table and writes JSON (default bench/results/sampling_<device>.json).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_result  # noqa: E402
from dit_video.cli import UsageError, exits_cleanly, parse_device  # noqa: E402
from dit_video.diffusion import SamplerConfig  # noqa: E402
from dit_video.pipeline import Pipeline  # noqa: E402
from dit_video.system import machine_name  # noqa: E402

PROMPT = "a red circle moving right on a gray background"


@contextlib.contextmanager
def timed_calls(pipe: Pipeline) -> Iterator[dict[str, float]]:
    """While inside, seconds spent in the calls `generate` makes, summed by name: "text <stage>",
    "sample <stage>" (which includes that stage's text encoding), "decode"; and "evaluations
    <stage>", the backbone's forward calls."""
    totals: dict[str, float] = defaultdict(float)
    cuda = pipe.device.type == "cuda"

    def timer(original, name):
        @functools.wraps(original)
        def timed(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                totals[name(args) if callable(name) else name] += time.perf_counter() - start
        return timed

    def count(name):
        def hook(module, args):
            totals[name] += 1
        return hook

    patched = [(pipe, "_sample_stage", timer(pipe._sample_stage, lambda args: f"sample {args[0].model.config.stage}")),
               (pipe.vae, "decode", timer(pipe.vae.decode, "decode"))]
    patched += [(s.model, "encode_text", timer(s.model.encode_text, f"text {s.model.config.stage}"))
                for s in pipe.stages]
    hooks = [s.model.backbone.register_forward_pre_hook(count(f"evaluations {s.model.config.stage}"))
             for s in pipe.stages]
    for obj, attr, fn in patched:
        object.__setattr__(obj, attr, fn)  # on the instance: shadows the method until deleted
    try:
        yield totals
    finally:
        for obj, attr, _ in patched:
            object.__delattr__(obj, attr)
        for hook in hooks:
            hook.remove()


def measure(pipe: Pipeline, prompts: list[str], sampler: SamplerConfig | None = None, repeats: int = 3,
            progress: bool = True) -> dict:
    """Median seconds of each part of `pipe.generate(prompts)` over `repeats` runs after a warm-up."""
    pipe.generate(prompts, sampler=sampler, progress=False)
    runs = []
    for _ in tqdm(range(repeats), desc="sampling", unit="video", leave=False, disable=not progress):
        with timed_calls(pipe) as totals:
            start = time.perf_counter()
            pipe.generate(prompts, sampler=sampler, progress=False)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            totals["total"] = time.perf_counter() - start
        runs.append(dict(totals))
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    stages = []
    for stage in pipe.stages:
        name = stage.model.config.stage
        steps = pipe.stage_settings(stage, sampler)[0].steps
        seconds = median[f"sample {name}"] - median[f"text {name}"]
        stages.append({"stage": name, "shape": "x".join(map(str, stage.shape)), "steps": steps, "seconds": seconds,
                       "per_step_s": seconds / steps, "evaluations": int(median[f"evaluations {name}"]),
                       "text_s": median[f"text {name}"]})
    return {"machine": machine_name(str(pipe.device)), "torch": torch.__version__, "batch": len(prompts),
            "size": f"{pipe.frames}x{pipe.height}x{pipe.width}", "repeats": repeats, "stages": stages,
            "text_s": sum(s["text_s"] for s in stages), "decode_s": median["decode"], "total_s": median["total"]}


def print_table(result: dict) -> None:
    print(f"{'part':<8} {'pixels':>10} {'steps':>5} {'evals':>5} {'ms':>9} {'ms/step':>8} {'share':>6}")
    total = result["total_s"]

    def line(part, ms, shape="", steps="", evals="", per_step=""):
        print(f"{part:<8} {shape:>10} {steps:>5} {evals:>5} {ms:9.1f} {per_step:>8} {100 * ms / 1e3 / total:5.1f}%")

    line("text", 1e3 * result["text_s"])
    for s in result["stages"]:
        line(s["stage"], 1e3 * s["seconds"], s["shape"], s["steps"], s["evaluations"], f"{1e3 * s['per_step_s']:.2f}")
    line("decode", 1e3 * result["decode_s"], result["size"])
    line("total", 1e3 * total)


def draw(ax, result: dict) -> None:
    """A panel: one bar of the generation's time, split into its parts."""
    parts = [("text", result["text_s"])] + [(s["stage"], s["seconds"]) for s in result["stages"]]
    left = 0.0
    for name, seconds in parts + [("decode", result["decode_s"])]:
        ax.barh(0, 1e3 * seconds, left=left, label=name)
        left += 1e3 * seconds
    ax.set(yticks=[], xlabel="ms", title=f"sampling {result['size']} ({result['model']}): "
                                         f"{1e3 * result['total_s']:.0f} ms in all")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8, ncol=len(parts) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.12))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "checkpoints/tiny"), help="a pipeline folder (default: the shipped)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, help="sampler steps of every stage (default: each stage's own)")
    p.add_argument("--batch", type=int, default=1, help="videos generated at once")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON path")
    return p


def check(args) -> None:
    parse_device(args.device)
    if args.batch < 1 or args.repeats < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--batch, --repeats and --steps must be >= 1")
    if not (Path(args.model) / "pipeline.yaml").is_file():
        raise UsageError(f"--model {args.model}: not a pipeline folder (no pipeline.yaml)")


def run(args) -> dict:
    """Load the pipeline, measure, print the table."""
    pipe = Pipeline.from_pretrained(args.model, device=args.device)
    sampler = None if args.steps is None else SamplerConfig(sampler=pipe.config.sampler.sampler, steps=args.steps)
    result = measure(pipe, [PROMPT] * args.batch, sampler, args.repeats)
    model = Path(args.model).resolve()
    result["model"] = str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else model.name  # no machine paths
    print_table(result)
    return result


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check(args)
    result = run(args)
    write_result(result, args.out, "sampling", args.device)


if __name__ == "__main__":
    main()
