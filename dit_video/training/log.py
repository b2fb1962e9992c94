"""What a run shows and keeps, on rank 0: a progress bar with loss, throughput and ETA, and the
metrics as JSONL (`metrics.jsonl`) and TensorBoard (`tensorboard/`) under the run's folder.

Each record also holds the throughput since the last one (`samples_per_s`), the training time so
far (`elapsed_s`, summed over resumes) and the peak memory so far (`peak_memory_mib`: what tensors
took on a CUDA device, else the process's peak resident set). On resume the JSONL is cut back to
the checkpoint's step, so that the file reads as one run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..system import peak_resident_bytes


class RunLog:
    def __init__(self, out_dir: Path, rank: int, total_steps: int, start_step: int, tensorboard: bool = True):
        self.active = rank == 0
        self.path = out_dir / "metrics.jsonl"
        self.bar = self.writer = None
        if not self.active:
            return
        self.elapsed = self._truncate(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        self.last_time, self.samples = time.perf_counter(), 0

    def _truncate(self, step: int) -> float:
        """Cut the records after `step`, and a last line torn by a kill mid-append; the training
        time up to `step`."""
        if not self.path.exists():
            return 0.0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        if lines:
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                lines.pop()
        kept = [record for record in map(json.loads, lines) if record.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        return kept[-1].get("elapsed_s", 0.0) if kept else 0.0

    def step(self, step: int, samples: int, metrics: dict[str, float], write: bool) -> None:
        """Advance the bar by one optimizer step of `samples` samples (all processes); every
        `write`, append the metrics with the throughput since the last write."""
        if not self.active:
            return
        self.samples += samples
        self.bar.update(1)
        if not write:
            return
        now = time.perf_counter()
        self.elapsed += now - self.last_time
        record = {"step": step, **metrics, "samples_per_s": self.samples / max(now - self.last_time, 1e-9),
                  "elapsed_s": self.elapsed, "peak_memory_mib": peak_memory_mib()}
        self.last_time, self.samples = now, 0
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "samples_per_s", "lr")})

    def message(self, text: str) -> None:
        if self.active:
            tqdm.write(text)

    def close(self) -> None:
        if self.active:
            self.bar.close()
            if self.writer is not None:
                self.writer.close()


def peak_memory_mib() -> float:
    """Peak memory of this process so far: tensors on the CUDA device when one is in use, else its
    own peak resident set."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_resident_bytes() / 2**20
