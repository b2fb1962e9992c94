"""What the benchmarks share: dtypes by name, checking the device, the matmul peak (MFU's
denominator), a worker process for peak memory on CPU, where results go, and writing a figure.
(The machine's name and this process's memory: dit_video.system, which the run log uses too.)"""

from __future__ import annotations

import json
import os
import subprocess
import time

from pathlib import Path

import torch

from dit_video.files import atomic_path, write_text_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results"


def result_path(out: str | None, name: str, device: str) -> Path:
    """`out`, or by default bench/results/NAME_cpu.json (or _cuda): the kind of machine in the name."""
    return Path(out) if out else RESULTS / f"{name}_{torch.device(device).type}.json"


def write_result(result: dict, out: str | None, name: str, device: str) -> Path:
    """Write a benchmark's result as JSON at `result_path` and say where, with the machine."""
    path = result_path(out, name, device)
    write_text_atomic(path, json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']} -> {path}")
    return path


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


def run_worker(cmd: list[str], for_memory: bool) -> object:
    """Run a worker command that prints one JSON value, in a fresh process so that its peak
    memory is its own. For memory, glibc gets a fixed mmap threshold, which makes it return
    large freed blocks at once, so the resident set follows the live tensors rather than the
    allocator's high-water mark; that setting slows the worker down, so time it without."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if for_memory else None
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)


def cuda_kernel_shares(fn) -> list[tuple[str, float]]:
    """Run `fn` once under the profiler: the GPU kernels it launched with their share of GPU time,
    longest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time
    whole = sum(totals.values()) or 1.0
    return sorted(((name, t / whole) for name, t in totals.items()), key=lambda kv: -kv[1])


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are files, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
