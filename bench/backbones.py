"""Training-step cost of the backbones versus video length: dit (factorized attention), dit3d
(joint attention) and unet3d at matched parameter counts, and, side by side, the Latte
transformer that diffusers ships (random weights) at the same width, depth, heads, patch and
input as our dit.

    python bench/backbones.py --width 192 --depth 4 --heads 3 --size 16 --frames 4 8 16 32
    python bench/backbones.py --device cuda --dtype bf16 --width 1152 --depth 28 --heads 16 --size 32 --frames 4 8 16

One step is forward + backward of a mean-square loss, batch 1 (--batch), text of 16 tokens.
Prints a table, writes JSON and a plot (tokens/s against frames) under bench/results/. Peak memory: as
in bench/vae.py (CUDA allocator, or a fresh CPU worker process per case). On CUDA it also
reports MFU: the analytic training FLOPs (3x the forward's) per second over the measured peak
of a large matrix product in the same dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import cuda_kernel_shares, machine, peak_rss_bytes, rss_bytes, run_worker  # noqa: E402
from dit_video.files import atomic_path, write_text_atomic  # noqa: E402
from dit_video.models import BACKENDS, DiT, DiTConfig, UNet3D, UNet3DConfig, resolve_backend  # noqa: E402
from dit_video.models.flops import count_flops, count_parameters  # noqa: E402

ARMS = ("dit", "dit3d", "unet3d", "latte")
TEXT_DIM, TEXT_LEN = 64, 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(arm: str, args, frames: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if arm in ("dit", "dit3d"):
        return DiT(DiTConfig(name=arm, width=args.width, depth=args.depth, heads=args.heads, text_dim=TEXT_DIM,
                             attention_backend=args.attention))
    if arm == "unet3d":
        return UNet3D(dataclasses.replace(unet_config(args), attention_backend=args.attention))
    from diffusers import LatteTransformer3DModel

    return LatteTransformer3DModel(
        num_attention_heads=args.heads, attention_head_dim=args.width // args.heads, in_channels=4, out_channels=4,
        num_layers=args.depth, cross_attention_dim=args.width, sample_size=args.size, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        caption_channels=TEXT_DIM, video_length=frames)


def unet_config(args) -> UNet3DConfig:
    """The U-Net whose parameter count is closest to our dit's (base width in steps of 16)."""
    with torch.device("meta"):
        return _closest_unet(args)


def _closest_unet(args) -> UNet3DConfig:
    target = count_parameters(DiT(DiTConfig(width=args.width, depth=args.depth, heads=args.heads, text_dim=TEXT_DIM)))

    def make(channels: int) -> UNet3DConfig:
        return UNet3DConfig(channels=channels, channel_mult=[1, 2, 2], blocks_per_level=2, attention_levels=[1, 2],
                            head_dim=16, norm_groups=16, text_dim=TEXT_DIM)

    best, channels = None, 16
    while True:  # grow the width until the count passes the target; keep the closest
        cfg = make(channels)
        gap = count_parameters(UNet3D(cfg)) - target
        if best is None or abs(gap) < best[0]:
            best = (abs(gap), cfg)
        if gap > 0:
            return best[1]
        channels += 16


def measure(arm: str, args, frames: int) -> tuple[float, int]:
    """Median seconds per training step, and peak memory above what was in use before it."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(arm, args, frames).to(device=device, dtype=dtype).train()
    z = torch.randn(args.batch, 4, frames, args.size, args.size, device=device, dtype=dtype)
    text = torch.randn(args.batch, TEXT_LEN, TEXT_DIM, device=device, dtype=dtype)
    if arm == "latte":
        step_inputs = dict(hidden_states=z, timestep=torch.full((args.batch,), 500, device=device),
                           encoder_hidden_states=text)
        forward = lambda: model(**step_inputs).sample  # noqa: E731
    else:
        forward = lambda: model(z, torch.zeros(args.batch, device=device), text=text)  # noqa: E731
    cuda = device.type == "cuda"

    def step():
        model.zero_grad(set_to_none=True)
        forward().float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    if cuda and args.profile:
        shares = cuda_kernel_shares(step)
        print(f"GPU kernels of one {arm} step at {frames} frames, by share of GPU time:")
        for name, share in shares[:args.profile]:
            print(f"  {100 * share:5.1f}%  {name[:110]}")
    return statistics.median(times), peak - base


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on `device`: the denominator of MFU."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--size", type=int, default=16, help="latent height and width")
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--attention", choices=BACKENDS, default="auto", help="attention backend of our arms")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="on CUDA, list the N GPU kernels that take the most time in one step")
    parser.add_argument("--out", default=None, help="JSON path; the plot goes beside it as .png")
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.worker[0], args, int(args.worker[1]))))
        return

    cuda = args.device.startswith("cuda")
    peak_flops = matmul_peak_flops(args.device, DTYPES[args.dtype]) if cuda else None
    rows = []
    print(f"{'arm':<7} {'frames':>6} {'params M':>9} {'step s':>8} {'tokens/s':>10} {'GFLOP':>8} {'peak MiB':>9}")
    for frames in args.frames:
        for arm in args.arms:
            if args.device.startswith("cuda"):
                seconds, peak = measure(arm, args, frames)
            else:
                cmd = [sys.executable, __file__, "--worker", arm, str(frames), *_passthrough(args)]
                seconds, _ = run_worker(cmd, for_memory=False)
                _, peak = run_worker(cmd, for_memory=True)
            with torch.device("meta"):  # counting needs the shapes only, not a second real model
                model = build(arm, args, frames)
            tokens = args.batch * frames * (args.size // 2) ** 2
            shape = (args.batch, 4, frames, args.size, args.size)
            flops = count_flops(model, shape, TEXT_LEN) if arm != "latte" else None
            row = {"arm": arm, "frames": frames, "tokens": tokens, "parameters": count_parameters(model),
                   "step_s": seconds, "tokens_per_s": tokens / seconds, "forward_gflop": flops and flops / 1e9,
                   "peak_mib": peak / 2**20,
                   "mfu": 3 * flops / seconds / peak_flops if flops and peak_flops else None}
            rows.append(row)
            gflop = f"{row['forward_gflop']:8.2f}" if flops else f"{'-':>8}"
            mfu = f"  MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
            print(f"{arm:<7} {frames:>6} {row['parameters'] / 1e6:9.2f} {seconds:8.3f} {row['tokens_per_s']:10.0f} "
                  f"{gflop} {row['peak_mib']:9.0f}{mfu}", flush=True)

    ratios = {}
    if {"dit", "latte"} <= set(args.arms):
        for frames in args.frames:
            step = {r["arm"]: r["step_s"] for r in rows if r["frames"] == frames}
            ratios[frames] = step["dit"] / step["latte"]
        print("dit step time / Latte step time: " + ", ".join(f"{f} frames {r:.2f}" for f, r in ratios.items()))
    result = {"machine": machine(args.device), "torch": torch.__version__, "dtype": args.dtype,
              "attention": resolve_backend(torch.device(args.device)) if args.attention == "auto" else args.attention,
              "matmul_peak_tflops": peak_flops and peak_flops / 1e12,
              "batch": args.batch, "width": args.width, "depth": args.depth, "heads": args.heads,
              "latent_size": args.size,
              "unet3d_config": dict(unet_config(args).__dict__), "rows": rows, "dit_over_latte_step_time": ratios}
    suffix = "cuda" if args.device.startswith("cuda") else "cpu"
    out = Path(args.out or ROOT / f"bench/results/backbones_{suffix}.json")
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    plot(rows, args, out.with_suffix(".png"))
    print(f"{result['machine']} -> {out} and {out.with_suffix('.png')}")


def _passthrough(args) -> list[str]:
    return ["--width", str(args.width), "--depth", str(args.depth), "--heads", str(args.heads), "--size",
            str(args.size), "--device", args.device, "--dtype", args.dtype, "--attention", args.attention,
            "--batch", str(args.batch), "--repeats", str(args.repeats)]


def plot(rows: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        left.plot([r["frames"] for r in mine], [r["tokens_per_s"] for r in mine], "o-", label=arm)
        right.plot([r["frames"] for r in mine], [r["peak_mib"] for r in mine], "o-", label=arm)
    for ax, label in ((left, "training tokens / s"), (right, "peak memory, MiB")):
        ax.set(xscale="log", xlabel="latent frames", ylabel=label)
        ax.set_xticks(args.frames, [str(f) for f in args.frames])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    left.legend()
    fig.suptitle(f"Backbones, width {args.width}, depth {args.depth}, {args.size}x{args.size} latents, "
                 f"{args.dtype} on {machine(args.device)}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


if __name__ == "__main__":
    main()
