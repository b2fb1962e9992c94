"""Training-step cost of the backbones versus video length: dit (factorized attention), dit3d
(joint attention) and unet3d at matched parameter counts (dit at --width; dit3d, which has one
attention per block instead of two, and unet3d at the width whose count is closest to dit's;
--match width keeps dit3d at dit's width), and, side by side, the two video transformers that
diffusers ships, with random weights at the same width, depth, heads, patch and input as our
arm they pair with:

- latte (`LatteTransformer3DModel`): factorized like dit; its depth counts pairs of blocks (a
  spatial one with cross-attention, then a temporal one, each with its own MLP), so at one width
  and depth it has dit's parameter count and about 1.4x its FLOPs.
- cogvideox (`CogVideoXTransformer3DModel`, CogVideoX-2b's design): full attention like dit3d,
  but the text tokens join the video tokens in that one attention (and the MLP) instead of a
  cross-attention layer, with q/k LayerNorms and 3D sin-cos positions added to the input (dit3d:
  2D sin-cos, and RoPE in time inside every attention); spatial patch 2, one latent frame per
  frame (temporal_compression_ratio 1, so its position table is the input's). Here dit3d takes
  the text the same way (`text_attention: joint`: the text's keys and values join the attention;
  unlike CogVideoX's, its text tokens are not carried through the blocks), which makes it 1-2%
  fewer FLOPs; with its own cross-attention layer (--text-attention cross) it is 5-8% more.

The fair pairs are dit/latte and dit3d/cogvideox; dit/cogvideox compares our default with
theirs. Each pair is reported as our step time over theirs, and as our time per FLOP over theirs
(the first includes each design's own amount of work, the second only how fast it is done).
All arms get the same tensors (latents [B, 4, T, H, W], CogVideoX in its frames-first layout; 16
text tokens of 64 channels, none masked), dtype, batch and train mode, no gradient checkpointing;
every arm runs PyTorch's scaled_dot_product_attention (ours with --attention sdpa, or auto, which
is sdpa except with xformers on CUDA).

    python bench/backbones.py --width 192 --depth 4 --heads 3 --size 16 --frames 4 8 16 32
    python bench/backbones.py --device cuda --dtype bf16 --width 1152 --depth 28 --heads 16 --size 32 --frames 4 8 16

One step is forward + backward of a mean-square loss, batch 1 (--batch), eager or with every
transformer block compiled (--compile). The arms are timed round-robin in one process (median of
--repeats), so a change in the machine's load hits all of them alike. Prints a table, writes JSON and a plot under bench/results/. Peak memory: as in
bench/vae.py (CUDA allocator, or a fresh CPU worker process per case). FLOPs are torch's count of
the forward on the meta device (shapes only; attention decomposes into its matrix products
there), which equals `count_flops` for our arms; TFLOP/s counts a step as 3x the forward. On
CUDA it also reports MFU against the measured peak of a large matrix product in the same dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (DTYPES, cuda_kernel_shares, matmul_peak_flops, pyplot, run_worker,  # noqa: E402
                          save_figure, write_result)
from dit_video.cli import UsageError, exits_cleanly, parse_device  # noqa: E402
from dit_video.models import (BACKENDS, DiT, DiTConfig, UNet3D, UNet3DConfig, compile_blocks,  # noqa: E402
                              resolve_backend)
from dit_video.models.flops import count_parameters  # noqa: E402
from dit_video.models.registry import backbone_parameters, match_parameters  # noqa: E402
from dit_video.system import machine_name, peak_resident_bytes, resident_bytes  # noqa: E402

ARMS = ("dit", "dit3d", "unet3d", "latte", "cogvideox")
THEIRS = ("latte", "cogvideox")  # from diffusers
PAIRS = {"dit/latte": ("dit", "latte"), "dit3d/cogvideox": ("dit3d", "cogvideox"),  # ours / theirs
         "dit/cogvideox": ("dit", "cogvideox")}
TEXT_DIM, TEXT_LEN = 64, 16


def build(arm: str, args, frames: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if arm in ("dit", "dit3d"):
        return DiT(DiTConfig(**transformer_config(arm, args), attention_backend=args.attention))
    if arm == "unet3d":
        return UNet3D(dataclasses.replace(unet_config(args), attention_backend=args.attention))
    from diffusers.utils import logging

    logging.set_verbosity_error()  # silences its warning on .to(dtype), moot for these models
    width = transformer_config("dit" if arm == "latte" else "dit3d", args)["width"]  # the arm it pairs with
    shared = dict(num_attention_heads=args.heads, attention_head_dim=width // args.heads, in_channels=4,
                  out_channels=4, num_layers=args.depth, patch_size=2, activation_fn="gelu-approximate")
    if arm == "latte":
        from diffusers import LatteTransformer3DModel

        return LatteTransformer3DModel(**shared, cross_attention_dim=width, sample_size=args.size,
                                       num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                       caption_channels=TEXT_DIM, video_length=frames)
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(**shared, time_embed_dim=width, text_embed_dim=TEXT_DIM,
                                       sample_width=args.size, sample_height=args.size, sample_frames=frames,
                                       temporal_compression_ratio=1, max_text_seq_length=TEXT_LEN)


def text_attention(arm: str, args) -> str:
    """How our `arm` sees the text: as its diffusers counterpart does unless --text-attention
    says otherwise (dit like Latte, with cross-attention; dit3d like CogVideoX, in its attention)."""
    if args.text_attention != "matched":
        return args.text_attention
    return "joint" if arm == "dit3d" else "cross"


@functools.cache
def _matched(name: str, width: int, depth: int, heads: int, dit_text: str, dit3d_text: str) -> dict:
    """The config of backbone `name` whose parameter count is closest to dit's at `width`: unet3d
    in steps of 16; dit3d in steps that keep whole heads of a multiple of 4 channels and a width
    that CogVideoX's 3D sin-cos positions can split (a multiple of 16), as its pair runs at it."""
    dit = {"name": "dit", "width": width, "depth": depth, "heads": heads, "text_dim": TEXT_DIM,
           "text_attention": dit_text}
    target = backbone_parameters(dit)
    if name == "dit3d":
        return match_parameters({**dit, "name": "dit3d", "text_attention": dit3d_text}, target,
                                step=math.lcm(4 * heads, 16))
    unet = {"name": "unet3d", "channel_mult": [1, 2, 2], "blocks_per_level": 2, "attention_levels": [1, 2],
            "head_dim": 16, "norm_groups": 16, "text_dim": TEXT_DIM}
    return match_parameters(unet, target, step=16)


def transformer_config(arm: str, args) -> dict:
    """DiTConfig keys of our `arm` (dit or dit3d); see the module docstring for dit3d's width."""
    cfg = {"name": arm, "width": args.width, "depth": args.depth, "heads": args.heads, "text_dim": TEXT_DIM,
           "text_attention": text_attention(arm, args)}
    if arm == "dit3d" and args.match == "parameters":
        cfg["width"] = _matched("dit3d", *_sizes(args))["width"]
    return cfg


def _sizes(args) -> tuple:
    return args.width, args.depth, args.heads, text_attention("dit", args), text_attention("dit3d", args)


def unet_config(args) -> UNet3DConfig:
    """The U-Net whose parameter count is closest to our dit's (base width in steps of 16)."""
    cfg = _matched("unet3d", *_sizes(args))
    return UNet3DConfig(**cfg)


def inputs(arm: str, args, frames: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents and text for `arm`, the same numbers for every arm, each in its own layout."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, 4, frames, args.size, args.size, generator=g)
    text = torch.randn(args.batch, TEXT_LEN, TEXT_DIM, generator=g)
    if arm == "cogvideox":  # frames before channels
        z = z.transpose(1, 2).contiguous()
    return z.to(device=device, dtype=dtype), text.to(device=device, dtype=dtype)


def forward(arm: str, model: torch.nn.Module, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """`model`'s prediction for `inputs`'s tensors, in z's shape."""
    b = z.shape[0]
    if arm in THEIRS:  # integer timesteps, a middle one
        t = torch.full((b,), 500, device=z.device)
        if arm == "latte":
            return model(z, timestep=t, encoder_hidden_states=text).sample
        return model(z, text, t).sample
    return model(z, torch.zeros(b, device=z.device), text=text)


def training_step(arm: str, args, frames: int):
    """A function that runs one training step of a fresh `arm` (zero grads, forward, backward)."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = build(arm, args, frames).to(device=device, dtype=dtype).train()
    if args.compile:
        compile_transformer(arm, model)
    z, text = inputs(arm, args, frames, device, dtype)

    def step():
        model.zero_grad(set_to_none=True)
        forward(arm, model, z, text).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def compile_transformer(arm: str, model: torch.nn.Module) -> None:
    """--compile: torch.compile each transformer block in place, ours (`compile_blocks`) and
    theirs alike, so that both sides fuse the same kind of work."""
    if arm in THEIRS:
        for block in (*model.transformer_blocks, *getattr(model, "temporal_transformer_blocks", ())):
            block.compile()
    else:
        compile_blocks(model)


def step_times(args, frames: int) -> dict[str, float]:
    """Median seconds per training step of each arm, timed round-robin after a warm-up step (which
    compiles, with --compile)."""
    steps = {arm: training_step(arm, args, frames) for arm in args.arms}
    for step in steps.values():
        step()
    times = {arm: [] for arm in steps}
    for _ in range(args.repeats):
        for arm, step in steps.items():
            start = time.perf_counter()
            step()
            times[arm].append(time.perf_counter() - start)
    if args.profile and args.device.startswith("cuda"):
        for arm, step in steps.items():
            print(f"GPU kernels of one {arm} step at {frames} frames, by share of GPU time:")
            for name, share in cuda_kernel_shares(step)[:args.profile]:
                print(f"  {100 * share:5.1f}%  {name[:110]}")
    return {arm: statistics.median(t) for arm, t in times.items()}


def peak_memory(arm: str, args, frames: int) -> int:
    """Peak memory of a training step above what was in use before it (after a warm-up step). On
    CPU only meaningful in a fresh process: see `memory`."""
    step = training_step(arm, args, frames)
    step()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else resident_bytes()
    step()
    return (torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes()) - base


def memory(arm: str, args, frames: int) -> int:
    if args.device.startswith("cuda"):
        return peak_memory(arm, args, frames)
    cmd = [sys.executable, __file__, "--worker", arm, str(frames), *_passthrough(args)]
    return run_worker(cmd, for_memory=True)


def forward_flops(arm: str, args, frames: int) -> float:
    with torch.device("meta"):
        model = build(arm, args, frames)
        z, text = inputs(arm, args, frames, "meta", torch.float32)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            forward(arm, model, z, text)
    return counter.get_total_flops()


def run(args) -> dict:
    """Time (and, unless --no-memory, measure the memory of) every arm at every frame count;
    prints the table as it goes and returns everything as a JSON-ready dict."""
    cuda = args.device.startswith("cuda")
    peak_flops = matmul_peak_flops(args.device, DTYPES[args.dtype]) if cuda else None
    print(f"{'arm':<9} {'frames':>6} {'params M':>9} {'step s':>8} {'tokens/s':>9} {'samples/s':>9} "
          f"{'GFLOP':>7} {'TFLOP/s':>8} {'peak MiB':>9}" + ("  MFU" if cuda else ""))
    rows = []
    bar = tqdm(total=len(args.frames) * len(args.arms), desc="backbones", unit="case", leave=False)
    for frames in args.frames:
        seconds = step_times(args, frames)
        for arm in args.arms:
            with torch.device("meta"):  # the count needs the shapes only
                parameters = count_parameters(build(arm, args, frames))
            flops, step_s = forward_flops(arm, args, frames), seconds[arm]
            tokens = args.batch * frames * (args.size // 2) ** 2
            row = {"arm": arm, "frames": frames, "tokens": tokens, "parameters": parameters, "step_s": step_s,
                   "tokens_per_s": tokens / step_s, "samples_per_s": args.batch / step_s,
                   "forward_gflop": flops / 1e9, "tflops": 3 * flops / step_s / 1e12,
                   "peak_mib": None if args.no_memory else memory(arm, args, frames) / 2**20,
                   "mfu": 3 * flops / step_s / peak_flops if peak_flops else None}
            rows.append(row)
            peak = f"{row['peak_mib']:9.0f}" if row["peak_mib"] is not None else f"{'-':>9}"
            tqdm.write(f"{arm:<9} {frames:>6} {parameters / 1e6:9.2f} {step_s:8.3f} {row['tokens_per_s']:9.0f} "
                       f"{row['samples_per_s']:9.2f} {row['forward_gflop']:7.2f} {row['tflops']:8.3f} {peak}"
                       + (f"  {100 * row['mfu']:.1f}%" if row["mfu"] else ""))
            bar.update()
    bar.close()
    backend = resolve_backend(torch.device(args.device)) if args.attention == "auto" else args.attention
    result = {"machine": machine_name(args.device), "torch": torch.__version__, "device": args.device,
              "dtype": args.dtype, "attention": backend, "matmul_peak_tflops": peak_flops and peak_flops / 1e12,
              "batch": args.batch, "width": args.width, "depth": args.depth, "heads": args.heads, "match": args.match,
              "dit3d_width": transformer_config("dit3d", args)["width"],
              "latent_size": args.size, "text_tokens": TEXT_LEN, "compile": args.compile,
              "text_attention": {a: text_attention(a, args) for a in args.arms if a in ("dit", "dit3d")}, "repeats": args.repeats,
              "unet3d_config": dict(unet_config(args).__dict__), "rows": rows, "ratios": ratios(rows)}
    print_ratios(result["ratios"])
    return result


def ratios(rows: list[dict]) -> list[dict]:
    """For each pair of PAIRS and frame count both were run at: our step time over theirs, and our
    time per FLOP over theirs (their TFLOP/s over ours)."""
    by = {(r["arm"], r["frames"]): r for r in rows}
    out = []
    for pair, (ours, theirs) in PAIRS.items():
        for frames in sorted({f for _, f in by}):
            if (ours, frames) in by and (theirs, frames) in by:
                a, b = by[ours, frames], by[theirs, frames]
                out.append({"pair": pair, "frames": frames, "step_time": a["step_s"] / b["step_s"],
                            "time_per_flop": b["tflops"] / a["tflops"]})
    return out


def print_ratios(rows: list[dict]) -> None:
    if rows:
        print(f"\n{'ours/theirs':<16} {'frames':>6} {'step time':>10} {'time/FLOP':>10}")
    for r in rows:
        print(f"{r['pair']:<16} {r['frames']:>6} {r['step_time']:10.2f} {r['time_per_flop']:10.2f}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--size", type=int, default=16, help="latent height and width")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--attention", choices=BACKENDS, default="auto", help="attention backend of our arms")
    p.add_argument("--text-attention", choices=("matched", "cross", "joint"), default="matched",
                   help="how our dit and dit3d arms see the text (DiTConfig.text_attention); matched: "
                        "as their diffusers counterparts (dit cross, like Latte; dit3d joint, like CogVideoX)")
    p.add_argument("--match", choices=("parameters", "width"), default="parameters",
                   help="dit3d at dit's parameter count (default) or at its width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer block (ours and theirs); not for unet3d")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (on CPU a fresh process per case)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="on CUDA, list the N GPU kernels that take the most time in one step of each arm")
    p.add_argument("--out", default=None, help="JSON path; the plot goes beside it as .png")
    p.add_argument("--worker", nargs=2, metavar=("ARM", "FRAMES"), help=argparse.SUPPRESS)
    return p


def check(args) -> None:
    """UsageError (one line) for arguments the sweep cannot run."""
    parse_device(args.device)
    if min(args.frames) < 1 or args.batch < 1 or args.repeats < 1:
        raise UsageError("--frames, --batch and --repeats must be >= 1")
    if args.size < 2 or args.size % 2:
        raise UsageError(f"--size {args.size}: the latent size must be even (patches of 2x2)")
    if args.width % args.heads or (args.width // args.heads) % 4:
        raise UsageError(f"--width {args.width} must split into {args.heads} heads of a multiple of 4 channels")
    if args.compile and "unet3d" in args.arms:
        raise UsageError("--compile: compiles transformer blocks; leave out the unet3d arm (see compile_blocks)")
    if set(args.arms) & set(THEIRS) and importlib.util.find_spec("diffusers") is None:
        raise UsageError("the latte and cogvideox arms need diffusers: pip install -e '.[bench]'")


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(peak_memory(args.worker[0], args, int(args.worker[1]))))
        return
    check(args)
    result = run(args)
    out = write_result(result, args.out, "backbones", args.device)
    plot(result, out.with_suffix(".png"))


def _passthrough(args) -> list[str]:
    return ["--width", str(args.width), "--depth", str(args.depth), "--heads", str(args.heads), "--size",
            str(args.size), "--device", args.device, "--dtype", args.dtype, "--attention", args.attention,
            "--text-attention", args.text_attention, "--match", args.match, "--batch", str(args.batch)] \
        + ["--compile"] * args.compile


def plot(result: dict, path: Path) -> None:
    panels = 3 if result["ratios"] else 2
    fig, axes = pyplot().subplots(1, panels, figsize=(5 * panels, 3.8), dpi=100)
    draw_rows(axes[0], result["rows"], "tokens_per_s", "training tokens / s")
    draw_rows(axes[1], result["rows"], "peak_mib", "peak memory, MiB")
    if result["ratios"]:
        draw_ratios(axes[2], result["ratios"])
    fig.suptitle(f"Backbones: {title(result)}", fontsize=10)
    save_figure(fig, path)


def title(result: dict) -> str:
    compiled = ", compiled" if result.get("compile") else ""
    return (f"width {result['width']}, depth {result['depth']}, {result['latent_size']}x{result['latent_size']} "
            f"latents, {result['dtype']}{compiled} on {result['machine']}")


def draw_rows(ax, rows: list[dict], key: str, label: str) -> None:
    """`key` of each arm's rows against the frame count."""
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm and r[key] is not None]
        ax.plot([r["frames"] for r in mine], [r[key] for r in mine], "o-" if arm not in THEIRS else "s--", label=arm)
    frames_axis(ax, sorted({r["frames"] for r in rows}), label)
    ax.legend(fontsize=8)


def draw_ratios(ax, ratios: list[dict]) -> None:
    """Ours over theirs per pair: step time (solid) and time per FLOP (dashed)."""
    for pair in PAIRS:
        mine = [r for r in ratios if r["pair"] == pair]
        if mine:
            frames = [r["frames"] for r in mine]
            line, = ax.plot(frames, [r["step_time"] for r in mine], "o-", label=f"{pair}: step time")
            ax.plot(frames, [r["time_per_flop"] for r in mine], "x--", color=line.get_color(), label="per FLOP")
    ax.axhline(1, color="gray", lw=0.8)
    frames_axis(ax, sorted({r["frames"] for r in ratios}), "ours / theirs (below 1: ours is faster)")
    ax.legend(fontsize=7, ncol=2)


def frames_axis(ax, frames: list[int], label: str) -> None:
    from matplotlib.ticker import NullLocator

    ax.set(xscale="log", xlabel="latent frames", ylabel=label)
    ax.set_xticks(frames, [str(f) for f in frames])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.grid(alpha=0.3)


if __name__ == "__main__":
    main()
