"""The attention backends side by side on the shapes dit-XL meets at 16x32x32 latents (16 frames
of 16x16 patches, 16 heads of 72 channels): agreement with a float64 reference, forward and
backward, and the time of a training step's attention; on CUDA also which kernels ran.

    python bench/attention.py --device cuda --dtype bf16
    python bench/attention.py --device cpu --dtype fp32 --frames 4 --patches 8

Errors are ||out - ref|| / ||ref|| for the output and the gradients of q, k, v and the bias (the
learned relative position bias of temporal attention). On CUDA, "kernels" lists the GPU kernels
the profiler saw in one forward + backward, by share of GPU time, and for xformers the operators
it dispatched to (names ending in "-pt" are PyTorch's kernels called through xformers). Prints a
table and writes JSON (default bench/results/attention_<device>.json).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import DTYPES, cuda_kernel_shares, write_result  # noqa: E402
from dit_video.cli import UsageError, exits_cleanly, parse_device  # noqa: E402
from dit_video.models import attention, resolve_backend, xformers_kernels  # noqa: E402
from dit_video.system import machine_name  # noqa: E402


def cases(args) -> dict[str, dict]:
    """name -> (q, k, v shapes as (batch, length), bias shape or None, key-mask length or None)."""
    hw, t = args.patches**2, args.frames
    return {
        "spatial": dict(batch=t, lq=hw, lk=hw, bias=False, mask=False),
        "temporal, RoPE": dict(batch=hw, lq=t, lk=t, bias=False, mask=False),
        "temporal, T5 bias": dict(batch=hw, lq=t, lk=t, bias=True, mask=False),
        "text cross, masked": dict(batch=t, lq=hw, lk=args.text_len, bias=False, mask=True),
        "joint (dit3d)": dict(batch=1, lq=t * hw, lk=t * hw, bias=False, mask=False),
    }


def inputs(case: dict, args, device, dtype, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    h, d = args.heads, args.head_dim
    q = torch.randn(case["batch"], h, case["lq"], d, device=device, generator=g)
    k, v = (torch.randn(case["batch"], h, case["lk"], d, device=device, generator=g) for _ in range(2))
    bias = torch.randn(1, h, case["lq"], case["lk"], device=device, generator=g) if case["bias"] else None
    mask = None
    if case["mask"]:  # every other sample keeps only its first half of the text tokens
        mask = torch.ones(case["batch"], case["lk"], dtype=torch.bool, device=device)
        mask[::2, case["lk"] // 2:] = False
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    if bias is not None:
        leaves.append(bias.to(dtype).requires_grad_())
    return leaves, mask


def run_backend(backend: str, leaves, mask, grad_out):
    q, k, v, *bias = leaves
    for x in leaves:
        x.grad = None
    out = attention(q, k, v, bias[0] if bias else None, mask, backend=backend)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def reference(leaves, mask, grad_out):
    """The math backend's formula in float64, with its gradients."""
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    q, k, v, *bias = ref_leaves
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias:
        scores = scores + bias[0]
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = scores.softmax(-1) @ v
    out.backward(grad_out.double())
    return [out.detach()] + [x.grad for x in ref_leaves]


def relative_errors(got, ref) -> list[float]:
    return [((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref)]


def step_time(backend: str, leaves, mask, grad_out, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    cuda = leaves[0].device.type == "cuda"
    for _ in range(3):
        run_backend(backend, leaves, mask, grad_out)
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_backend(backend, leaves, mask, grad_out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            run_backend(backend, leaves, mask, grad_out)
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def gpu_kernels(backend: str, leaves, mask, grad_out, top: int = 4) -> list[str]:
    """The GPU kernels of one forward + backward, the `top` longest first, with their time share."""
    shares = cuda_kernel_shares(lambda: run_backend(backend, leaves, mask, grad_out))[:top]
    return [f"{100 * share:.0f}% {name[:90]}" for name, share in shares]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--patches", type=int, default=16, help="patches per side of a frame")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=72)
    p.add_argument("--text-len", type=int, default=77)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    return p


def check(args) -> None:
    parse_device(args.device)
    if min(args.frames, args.patches, args.heads, args.head_dim, args.text_len, args.repeats) < 1:
        raise UsageError("--frames, --patches, --heads, --head-dim, --text-len and --repeats must be >= 1")


def run(args) -> dict:
    """Every case on every backend: prints the table as it goes, returns a JSON-ready dict."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cuda = device.type == "cuda"
    backends = ["math", "sdpa"] + (["xformers"] if cuda and resolve_backend(device) == "xformers" else [])
    rows = []
    print(f"{'case':<20} {'backend':<9} {'ms':>8} {'err out':>9} {'err dq':>9} {'err dk':>9} {'err dv':>9} "
          f"{'err dbias':>9}")
    for seed, (name, case) in enumerate(cases(args).items()):
        leaves, mask = inputs(case, args, device, dtype, seed)
        grad_out = torch.randn(leaves[0].shape, device=device, generator=torch.Generator(device).manual_seed(99))
        ref = reference(leaves, mask, grad_out)
        for backend in backends:
            errors = relative_errors(run_backend(backend, leaves, mask, grad_out), ref)
            row = {"case": name, **case, "backend": backend, "ms": 1e3 * step_time(backend, leaves, mask, grad_out,
                                                                                   args.repeats),
                   "errors": dict(zip(["out", "dq", "dk", "dv", "dbias"], errors))}
            if cuda:
                row["kernels"] = gpu_kernels(backend, leaves, mask, grad_out)
                if backend == "xformers":
                    q, k, v, *bias = (x.detach() for x in leaves)
                    row["xformers_ops"] = xformers_kernels(q, k, v, bias[0] if bias else None)
            rows.append(row)
            err = " ".join(f"{e:9.1e}" for e in errors) + (f" {'-':>9}" if len(errors) == 4 else "")
            print(f"{name:<20} {backend:<9} {row['ms']:8.3f} {err}", flush=True)

    if cuda:
        print("\nkernels, forward + backward:")
        for row in rows:
            ops = row.get("xformers_ops")
            via = f" [xformers {ops['forward']} / {ops['backward']}]" if ops else ""
            print(f"  {row['case']:<20} {row['backend']:<9}{via}: " + "; ".join(row["kernels"]))
    return {"machine": machine_name(args.device), "torch": torch.__version__, "dtype": args.dtype,
            "shape": {k: getattr(args, k) for k in ("frames", "patches", "heads", "head_dim", "text_len")},
            "auto_backend": resolve_backend(device), "rows": rows}


def draw(ax, result: dict) -> None:
    """A panel: ms of a forward + backward per case, a bar per backend."""
    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    backends = list(dict.fromkeys(r["backend"] for r in result["rows"]))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        ms = {r["case"]: r["ms"] for r in result["rows"] if r["backend"] == backend}
        ax.bar([c + i * width for c in range(len(cases))], [ms[c] for c in cases], width, label=backend)
    ax.set_xticks([c + width * (len(backends) - 1) / 2 for c in range(len(cases))], cases, rotation=20, ha="right",
                  fontsize=7)
    shape = result["shape"]
    ax.set(yscale="log", ylabel="ms, forward + backward",
           title=f"attention: {shape['frames']} frames of {shape['patches']}x{shape['patches']}, "
                 f"{shape['heads']} heads x {shape['head_dim']}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    check(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # shows which kernels "auto" picked
    result = run(args)
    write_result(result, args.out, "attention", args.device)


if __name__ == "__main__":
    main()
