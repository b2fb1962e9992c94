"""What the benchmarks share: naming the machine, and peak memory on CPU and CUDA."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess

import torch


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
