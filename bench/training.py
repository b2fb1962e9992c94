"""End-to-end training throughput: train.py on pre-encoded latents, eager and with compiled blocks.

    python bench/training.py --device cuda --batch 4      # dit-XL on 16x32x32 latents, bf16 (ZeRO-2)
    python bench/training.py --quick                      # tiny sizes on CPU: that it all runs

Makes its inputs under --work first: --clips synthetic clips of --frames x --size x --size pixels,
an untrained VAE of --vae's config (throughput does not depend on its weights; the base VAE's
4x8x8 turns 61x256x256 into 16x32x32 latents) and the clips' latents, cached once. Then, for each
of --modes, train.py trains the backbone (--backbone-size, text from the byte-level encoder) on the
cached latents for --steps steps, logging every --log-every; the first log window holds the
warm-up (and the compilation), so the throughput is the median over the later windows. Each run's
folder is deleted once read: dit-XL's checkpoint and export are tens of GB.

MFU counts 3 x the backbone's analytic forward FLOPs (`count_flops`, with the text encoder's
longest caption of the data as the text length) per sample against the measured matmul peak; the
text encoder, the loss and the optimizer step take time but add no FLOPs here, so the figure errs
low. Peak memory is the training process's (CUDA allocator). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import DTYPES, matmul_peak_flops, write_result  # noqa: E402
from dit_video.cli import UsageError, exits_cleanly, parse_device  # noqa: E402
from dit_video.config import from_dict, read_yaml  # noqa: E402
from dit_video.models import DiT, DiTConfig  # noqa: E402
from dit_video.models.flops import count_flops, count_parameters  # noqa: E402
from dit_video.system import machine_name  # noqa: E402
from vae import VAEConfig  # noqa: E402

QUICK = ["--backbone-size", "tiny", "--frames", "9", "--size", "32", "--clips", "4", "--batch", "2", "--steps", "4",
         "--log-every", "2", "--vae", "configs/vae/tiny.yaml"]
TEXT = {"encoder": "bytes", "dim": 256, "depth": 4, "heads": 4, "max_length": 96}


def prepare(args) -> tuple[Path, Path, int]:
    """Clips, an untrained VAE and the clips' latents under --work (reused when there): (VAE
    folder, latent cache, longest caption in bytes)."""
    from dit_video.data import Shape
    from dit_video.data.latent_cache import cache_latents
    from dit_video.data.synthetic import generate
    from vae import VideoVAE

    work = Path(args.work) / f"{args.frames}x{args.size}x{args.size}_{args.clips}"
    manifest = work / "clips/train/manifest.jsonl"
    if not manifest.exists():
        generate(work / "clips", "train", count=args.clips, frames=args.frames, size=args.size)
    vae = work / "vae"
    if not (vae / "config.yaml").exists():
        torch.manual_seed(0)
        VideoVAE.from_config(ROOT / args.vae).save_pretrained(vae)
    latents = work / "latents"
    if not latents.exists():
        cache_latents(manifest, vae, [Shape(args.frames, args.size, args.size)], latents, device=args.device)
    longest = max(len(json.loads(line)["caption"].encode()) for line in manifest.read_text().splitlines())
    return vae, latents, min(longest, TEXT["max_length"])


def config(args, vae: Path, latents: Path) -> dict:
    return {"stage": "base", "out_dir": "unused", "vae": str(vae),
            "backbone": {"name": "dit", "size": args.backbone_size},
            "text": {**TEXT, "caption_dropout": 0.1},
            "data": {"latents": str(latents), "num_workers": 2,
                     "buckets": [{"frames": args.frames, "height": args.size, "width": args.size,
                                  "batch_size": args.batch}]},
            "optim": {"zero": args.zero, "lr": 1e-4},
            "train": {"steps": args.steps, "log_every": args.log_every, "checkpoint_every": args.steps,
                      "tensorboard": False},
            "preview": {"every": 0}}


def train(args, run_config: Path, out: Path, compiled: bool) -> list[dict]:
    """train.py in its own process: the records of its run log."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [sys.executable, str(ROOT / "train.py"), str(run_config), f"out_dir={out}",
           f"train.compile={str(compiled).lower()}"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"train.py failed ({result.returncode}): {last}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def measure(args) -> dict:
    vae, latents, text_len = prepare(args)
    work = Path(args.work)
    run_config = work / "training.yaml"
    run_config.write_text(yaml.safe_dump(config(args, vae, latents)))
    vae_config = from_dict(VAEConfig, read_yaml(vae / "config.yaml"))
    shape = (1, vae_config.latent_channels, (args.frames - 1) // vae_config.temporal_factor + 1,
             args.size // vae_config.spatial_factor, args.size // vae_config.spatial_factor)
    with torch.device("meta"):
        backbone = DiT(DiTConfig(size=args.backbone_size, in_channels=shape[1], text_dim=TEXT["dim"]))
    flops = count_flops(backbone, shape, text_len)  # per sample
    cuda = args.device.startswith("cuda")
    peak = matmul_peak_flops(args.device, DTYPES["bf16"]) if cuda else None
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)
    print(f"{'mode':<9} {'samples/s':>9} {'tokens/s':>9} {'TFLOP/s':>8} {'peak MiB':>9}" + ("    MFU" if cuda else ""))
    rows = []
    for mode in args.modes:
        out = work / f"run_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        records = train(args, run_config, out, mode == "compiled")
        shutil.rmtree(out)
        timed = records[1:] or records  # the first window holds the warm-up and the compilation
        samples_per_s = statistics.median(r["samples_per_s"] for r in timed)
        row = {"mode": mode, "samples_per_s": samples_per_s, "tokens_per_s": samples_per_s * tokens,
               "tflops": 3 * flops * samples_per_s / 1e12, "mfu": 3 * flops * samples_per_s / peak if peak else None,
               "peak_memory_mib": max(r["peak_memory_mib"] for r in records),
               "first_window_samples_per_s": records[0]["samples_per_s"], "losses": [r["loss"] for r in records]}
        rows.append(row)
        print(f"{mode:<9} {samples_per_s:9.2f} {row['tokens_per_s']:9.0f} {row['tflops']:8.2f} "
              f"{row['peak_memory_mib']:9.0f}" + (f" {100 * row['mfu']:5.1f}%" if row["mfu"] else ""))
    return {"machine": machine_name(args.device), "torch": torch.__version__, "device": args.device,
            "precision": "bf16" if cuda else "fp32", "zero": args.zero, "backbone": f"dit-{args.backbone_size}",
            "parameters": count_parameters(backbone), "latent_shape": list(shape[1:]), "tokens_per_sample": tokens,
            "text_tokens": text_len, "batch": args.batch, "steps": args.steps, "log_every": args.log_every,
            "forward_gflop_per_sample": flops / 1e9, "matmul_peak_tflops": peak and peak / 1e12, "rows": rows}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu trains in fp32, cuda in bf16 (train.py's auto precision)")
    p.add_argument("--backbone-size", choices=("tiny", "S", "B", "L", "XL"), default="XL")
    p.add_argument("--frames", type=int, default=61, help="pixel frames of a clip (61: 16 latent frames)")
    p.add_argument("--size", type=int, default=256, help="pixel height and width (256: 32x32 latents)")
    p.add_argument("--vae", default="configs/vae/base.yaml", help="the VAE config, relative to the repository")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--batch", type=int, default=4, help="per process")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--modes", nargs="+", choices=("eager", "compiled"), default=["eager", "compiled"])
    p.add_argument("--work", default="runs/bench_training", help="where the clips, VAE, latents and runs go")
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU: " + " ".join(QUICK))
    p.add_argument("--out", default=None, help="JSON path (default bench/results/training_<device>.json)")
    return p


def check(args) -> None:
    parse_device(args.device)
    if args.steps < 2 * args.log_every:
        raise UsageError(f"--steps {args.steps}: give at least two log windows of --log-every {args.log_every}, "
                         "the first being the warm-up")
    if min(args.frames, args.size, args.clips, args.batch, args.log_every) < 1:
        raise UsageError("--frames, --size, --clips, --batch and --log-every must be >= 1")
    if not (ROOT / args.vae).is_file():
        raise UsageError(f"--vae {args.vae}: no such config")


@exits_cleanly
def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.quick:
        args = parser().parse_args(QUICK + argv)
    check(args)
    result = measure(args)
    return write_result(result, args.out, "training_quick" if args.quick else "training", args.device)


if __name__ == "__main__":
    main()
