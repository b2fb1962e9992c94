"""Encode and decode throughput and peak memory of the video VAE versus video length, in one
pass and in temporal chunks (causal cache).

    python bench/vae.py --config configs/vae/tiny.yaml --size 64 --frames 9 17 33 65 --chunk 8
    python bench/vae.py --config configs/vae/base.yaml --device cuda --dtype bf16 --size 256 --frames 17 33 65 129

Prints a table and writes JSON (default bench/results/vae_<device>.json) with the machine named.
Peak memory is torch's peak allocation on CUDA; on CPU it is the peak resident set of a fresh
worker process per case (with glibc set to return freed blocks at once), less its resident set
before the pass; CPU times come from another worker without that setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import DTYPES, run_worker  # noqa: E402
from dit_video.files import write_text_atomic  # noqa: E402
from dit_video.system import machine_name, peak_resident_bytes, resident_bytes  # noqa: E402
from vae import VideoVAE  # noqa: E402


def measure(config: str, device: str, dtype: str, size: int, frames: int, chunk: int | None,
            repeats: int, op: str) -> tuple[float, int]:
    """Seconds per `op` ("encode" or "decode") of one [1, 3, frames, size, size] video, and the
    peak memory in bytes above what was in use before it."""
    torch.manual_seed(0)
    vae = VideoVAE.from_config(config).to(device=device, dtype=DTYPES[dtype]).eval()
    video_shape = (1, 3, frames, size, size)
    if op == "encode":
        x = torch.rand(video_shape, device=device).to(DTYPES[dtype]) * 2 - 1
        fn = lambda: vae.encode(x, chunk_frames=chunk)  # noqa: E731
    else:
        x = torch.randn(vae.latent_shape(video_shape), device=device).to(DTYPES[dtype])
        fn = lambda: vae.decode(x, chunk_latents=None if chunk is None else chunk // vae.temporal_factor)  # noqa: E731
    cuda = device.startswith("cuda")
    with torch.inference_mode():
        fn()  # warm-up: kernel selection, allocator
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else resident_bytes()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        peak = torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes()
    return seconds, peak - base


def case(args, frames: int, chunk: int | None) -> dict:
    """Both ops of one case; on CPU each in a fresh worker process, so its peak is its own."""
    row = {"frames": frames, "size": args.size, "chunk_frames": chunk, "dtype": args.dtype}
    for op in ("encode", "decode"):
        if args.device.startswith("cuda"):
            seconds, peak = measure(args.config, args.device, args.dtype, args.size, frames, chunk, args.repeats, op)
        else:
            cmd = [sys.executable, __file__, "--worker", op, "--config", args.config, "--device", args.device,
                   "--dtype", args.dtype, "--size", str(args.size), "--frames", str(frames),
                   "--chunk", str(chunk or 0), "--repeats", str(args.repeats)]
            seconds, _ = run_worker(cmd, for_memory=False)
            _, peak = run_worker(cmd, for_memory=True)
        row.update({f"{op}_s": seconds, f"{op}_frames_per_s": frames / seconds, f"{op}_peak_mib": peak / 2**20})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs/vae/tiny.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 65])
    parser.add_argument("--chunk", type=int, default=8, help="chunk_frames of the chunked runs (0: no chunked runs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", choices=["encode", "decode"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(measure(args.config, args.device, args.dtype, args.size, args.frames[0],
                                 args.chunk or None, args.repeats, args.worker)))
        return

    rows = []
    for frames in args.frames:
        for chunk in ([None, args.chunk] if args.chunk else [None]):
            if chunk is not None and frames <= 1 + chunk:
                continue
            rows.append(case(args, frames, chunk))
            r = rows[-1]
            print(f"{r['frames']:>4} frames {r['size']}x{r['size']} {r['dtype']} chunk {str(r['chunk_frames']):>4}: "
                  f"encode {r['encode_frames_per_s']:8.1f} frames/s {r['encode_peak_mib']:8.0f} MiB | "
                  f"decode {r['decode_frames_per_s']:8.1f} frames/s {r['decode_peak_mib']:8.0f} MiB", flush=True)

    vae = VideoVAE.from_config(args.config)
    result = {"machine": machine_name(args.device), "torch": torch.__version__, "config": Path(args.config).name,
              "parameters_m": sum(p.numel() for p in vae.parameters()) / 1e6, "rows": rows}
    out = Path(args.out or ROOT / f"bench/results/vae_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json")
    write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']}, {result['parameters_m']:.1f}M parameters -> {out}")


if __name__ == "__main__":
    main()
