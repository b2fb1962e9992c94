"""Generate videos from text with a pipeline folder (base -> TSR -> SSR -> VAE decode):

    python sample.py --prompt "a red circle moving right on a gray background"
    python sample.py --prompts prompts.txt --seed 3 --sampler pc --steps 50 --guidance 4 --gif --sheet
    python sample.py --prompt "..." --extend 3                  # 3 more chunks, each continuing the last
    python sample.py --prompt "..." --interpolate a.png b.png   # the frames between two given frames

writes OUT (an H.264 mp4; with several prompts OUT_0.mp4, OUT_1.mp4, ...), with --gif and
--sheet a GIF and a PNG contact sheet beside each, and OUT.yaml: the effective settings. The
guidance weight w follows the papers: (1 + w) x_cond - w x_uncond, so 0 is off (diffusers'
guidance_scale is 1 + w).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from dit_video.cli import UsageError, check_output_path, exits_cleanly, parse_device
from dit_video.config import to_dict
from dit_video.data import VideoError
from dit_video.data.image import read_image
from dit_video.data.looks import write_contact_sheet, write_gif
from dit_video.data.video import VideoWriter
from dit_video.diffusion import SAMPLERS, GuidanceConfig, SamplerConfig
from dit_video.files import write_text_atomic
from dit_video.pipeline import Pipeline

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "tiny"


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", action="append", default=[], help="a text prompt (repeat for a batch)")
    parser.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one per line")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a pipeline folder (default: the shipped one)")
    parser.add_argument("--out", default="outputs/sample.mp4", help="the mp4 to write (default: %(default)s)")
    parser.add_argument("--gif", action="store_true", help="also write an animated GIF of each video")
    parser.add_argument("--sheet", action="store_true", help="also write a PNG contact sheet of each video")
    parser.add_argument("--seed", type=int, default=0, help="video i starts from the noise of seed + i")
    parser.add_argument("--sampler", help=f"one of {', '.join(SAMPLERS)} (default: the pipeline's)")
    parser.add_argument("--steps", type=int, help="sampler steps of every stage (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance weight w, 0 = off")
    parser.add_argument("--oscillate", type=float, metavar="W_LOW",
                        help="oscillating guidance: alternate --guidance with this weight (Imagen Video)")
    parser.add_argument("--frames", type=int, help="output frames per chunk (default: the pipeline's)")
    parser.add_argument("--size", metavar="HxW", help="output frame size (default: the pipeline's)")
    parser.add_argument("--fps", type=float, help="frame rate of the files (default: the pipeline's)")
    parser.add_argument("--extend", type=int, default=0, metavar="N", help="generate N further chunks")
    parser.add_argument("--interpolate", nargs="+", metavar="IMAGE",
                        help="fill the frames between these images (2 or more, in order)")
    parser.add_argument("--method", choices=("guided", "replacement"), default="guided",
                        help="conditioning of --extend: reconstruction guidance or replacement (to compare)")
    parser.add_argument("--reconstruction-weight", type=float, metavar="W_R",
                        help="weight of the reconstruction guidance (default: the pipeline's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        try:
            prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"{args.prompts}: cannot read the prompts ({e.__class__.__name__})") from None
    if not prompts:
        raise UsageError("give a prompt: --prompt \"...\" or --prompts FILE")
    if any(not p.strip() for p in prompts):
        raise UsageError("an empty prompt: every --prompt needs some text")
    return [p.strip() for p in prompts]


def check_numbers(args: argparse.Namespace) -> None:
    """UsageError for a number out of its range: NaN and infinities included, and 0 where it
    would otherwise silently mean the pipeline's default."""
    bounds = {"--steps": (args.steps, 1), "--frames": (args.frames, 1), "--extend": (args.extend, 0),
              "--guidance": (args.guidance, 0), "--oscillate": (args.oscillate, 0),
              "--reconstruction-weight": (args.reconstruction_weight, 0)}
    for name, (value, low) in bounds.items():
        if value is not None and not (math.isfinite(value) and value >= low):
            raise UsageError(f"{name} must be a finite number >= {low}, got {value}")
    if args.fps is not None and not (math.isfinite(args.fps) and args.fps > 0):
        raise UsageError(f"--fps must be a finite number > 0, got {args.fps}")
    if not 0 <= args.seed < 2**63 - 2**31:  # video i uses seed + i
        raise UsageError(f"--seed must be in [0, 2^63 - 2^31), got {args.seed}")


def settings(args: argparse.Namespace, pipeline: Pipeline) -> tuple[SamplerConfig | None, GuidanceConfig | None]:
    """The sampler and guidance the command line asks for (None: each stage's own)."""
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler: unknown sampler {args.sampler!r}; choose from {', '.join(SAMPLERS)}")
    sampler = guidance = None
    try:
        if args.steps is not None:  # every stage, a distilled one too, runs these steps
            sampler = SamplerConfig(sampler=args.sampler or pipeline.config.sampler.sampler, steps=args.steps)
        elif args.sampler is not None:  # only the kind: each stage keeps its own steps
            sampler = args.sampler
        if args.guidance is not None or args.oscillate is not None:
            weight = pipeline.config.guidance.weight if args.guidance is None else args.guidance
            # the pipeline's other guidance settings (rescale, thresholding) stay
            low = pipeline.config.guidance.weight_low if args.oscillate is None else args.oscillate
            guidance = dataclasses.replace(pipeline.config.guidance, weight=weight, weight_low=low)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    return sampler, guidance


def output_paths(out: Path, count: int, gif: bool, sheet: bool) -> list[dict[str, Path]]:
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {out}: the output is an mp4, the name must end in .mp4")
    stems = [out.with_suffix("")] if count == 1 else [out.with_name(f"{out.stem}_{i}") for i in range(count)]
    paths = []
    for stem in stems:
        files = {"mp4": stem.with_suffix(".mp4")}
        if gif:
            files["gif"] = stem.with_suffix(".gif")
        if sheet:
            files["sheet"] = stem.with_suffix(".png")
        paths.append(files)
    return paths


def _stamp(path: Path) -> tuple[int, int] | None:
    """What tells a file replaced by this run from the one that was there (None: no file)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = arguments(sys.argv[1:] if argv is None else argv)
    check_numbers(args)
    prompts = read_prompts(args)
    out = Path(args.out)
    paths = output_paths(out, len(prompts), args.gif, args.sheet)
    for files in paths:
        for path in files.values():
            check_output_path(path)
    check_output_path(out.with_suffix(".yaml"))
    if args.interpolate and args.extend:
        raise UsageError("--extend and --interpolate: choose one")
    if args.interpolate and args.method == "replacement":
        raise UsageError("--method replacement needs known latent frames: it conditions --extend only (a single "
                         "end frame has no latent of its own in a causal VAE)")
    device = parse_device(args.device)

    pipeline = Pipeline.from_pretrained(args.model, device)
    sampler, guidance = settings(args, pipeline)
    frames = pipeline.frames if args.frames is None else args.frames
    height, width = pipeline.height, pipeline.width
    if args.size:
        try:
            height, width = (int(n) for n in args.size.lower().split("x"))
        except ValueError:
            raise UsageError(f"--size {args.size}: expected HxW, e.g. 64x64") from None
        if min(height, width) < 1:
            raise UsageError(f"--size {args.size}: height and width must be >= 1")
    try:
        pipeline.set_size(frames, height, width)
        if args.extend:
            pipeline.context_frames()
    except ValueError as e:
        raise UsageError(str(e)) from None
    keyframes = None
    if args.interpolate:
        if len(args.interpolate) < 2:
            raise UsageError("--interpolate needs 2 or more images")
        try:
            keyframes = torch.stack([read_image(p, (height, width))[:, 0] for p in args.interpolate])
        except VideoError as e:
            raise UsageError(str(e)) from None
    fps = pipeline.config.fps if args.fps is None else args.fps

    if keyframes is not None:
        chunks = pipeline.interpolate(prompts, keyframes, args.seed, args.reconstruction_weight, sampler, guidance)
        total = len(keyframes) - 1
    else:
        chunks = pipeline.extend(prompts, args.extend, args.seed, args.method, args.reconstruction_weight,
                                 sampler, guidance)
        total = args.extend + 1
    looks = [[] for _ in prompts] if args.gif or args.sheet else None
    outputs = [path for files in paths for path in files.values()]
    before = {path: _stamp(path) for path in outputs}
    try:
        with contextlib.ExitStack() as files:  # every file appears complete at the end, or not at all
            writers = [files.enter_context(VideoWriter(p["mp4"], fps)) for p in paths]
            for chunk in tqdm(chunks, total=total, desc="chunks", disable=total == 1):
                for i, writer in enumerate(writers):
                    writer.write(chunk[i])
                    if looks is not None:
                        looks[i].append(chunk[i].cpu())
        for i, files in enumerate(paths):
            if "gif" in files:
                write_gif(files["gif"], torch.cat(looks[i], dim=1), fps)
            if "sheet" in files:
                write_contact_sheet(files["sheet"], torch.cat(looks[i], dim=1))
    except OSError:  # a disk that fills up half-way: no partial set of this run's outputs either
        for path in outputs:
            if _stamp(path) not in (None, before[path]):  # written by this run; older files stay
                path.unlink()
        raise
    effective = {"model": str(args.model), "prompts": prompts, "seed": args.seed, "frames": frames,
                 "size": [height, width], "fps": fps, "extend": args.extend, "interpolate": args.interpolate,
                 "method": args.method if (args.extend or args.interpolate) else None,
                 "reconstruction_weight": pipeline.config.reconstruction_weight if args.reconstruction_weight is None
                 else args.reconstruction_weight,
                 "device": str(device),
                 "stages": [{"model": s.config.model, "pixels": list(s.shape),
                             **{k: to_dict(v) for k, v in zip(("sampler", "guidance"),
                                                              pipeline.stage_settings(s, sampler, guidance))},
                             "aug_logsnr": s.config.aug_logsnr} for s in pipeline.stages],
                 "files": [{k: str(v) for k, v in f.items()} for f in paths]}
    write_text_atomic(out.with_suffix(".yaml"), yaml.safe_dump(effective, sort_keys=False, default_flow_style=None))
    for files in paths:
        print(" ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
