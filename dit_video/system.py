"""What the machine is and how much memory this process holds: for reports and run logs."""

from __future__ import annotations

import os
import platform
import resource

import torch


def machine_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's kind with its cores and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu, threads = platform.processor() or platform.machine(), torch.get_num_threads()
    return f"{cpu} CPU, {os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)}"


def resident_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    """This process's own peak resident set. On Linux from VmHWM, not getrusage's ru_maxrss: Linux
    carries ru_maxrss over from the parent through fork and exec, so a process started by a large
    one (a training run started by the A/B command, a benchmark's worker) would report its
    parent's size. Elsewhere ru_maxrss (in bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024
