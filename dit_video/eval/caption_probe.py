"""How much a base model relies on each word of its caption, measured in seconds, not by sampling:

    python -m dit_video.eval.caption_probe --model runs/tiny/base/model --latents data/pipeline/latents

Clean latents of training clips are noised at a few log-SNR levels, and the model denoises each
one several times over: with its true caption, with one attribute of the caption changed (the
next value of that attribute in the synthetic domain: red -> green, right -> left, ...), and with
the null text. The denoising error with the true caption is what the model achieves; how much
a wrong attribute raises it is how much the model uses that attribute. An attribute the model
has not learned leaves the error unchanged, however the sampler or the guidance weight is set,
so this is where a missed attribute of the adherence evaluation should be looked for first.
It watches a training run cheaply: point it at any exported model folder (and
`dit_video.eval.learning_curve` at every checkpoint of a run).

The error's increase answers "is the word used at all"; `attribute_identification` answers "how
well": the model as a classifier of the clip it denoises (Li et al. 2023, "Your Diffusion Model
is Secretly a Zero-Shot Classifier"). Each clip is denoised under every value of an attribute,
the other words kept; the value with the lowest error is the model's guess. Chance is one over
the number of values (1/3 for shapes, 1/5 colors, 1/4 directions, 1/3 backgrounds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..cli import UsageError, exits_cleanly
from ..data.latent_cache import LatentDataset
from ..data.synthetic import caption as make_caption
from ..diffusion import diffuse
from ..files import write_text_atomic
from ..models.pretrained import DiffusionModel
from .adherence import ATTRIBUTES, attribute_values, parse_caption

# denoise(z, logsnr, captions or None for the null text) -> x_hat
CaptionDenoiser = Callable[[torch.Tensor, torch.Tensor, "list[str] | None"], torch.Tensor]


def with_value(captions: Sequence[str], attribute: str, value: str) -> list[str]:
    """Each caption with `attribute` set to `value`, its other words kept."""
    return [make_caption(**{**parse_caption(text), attribute: value}) for text in captions]


def changed_captions(captions: Sequence[str], attribute: str) -> list[str]:
    """Each caption with `attribute` set to the value after its own (cyclically, in the domain's order)."""
    values = attribute_values(attribute)
    out = []
    for text in captions:
        attrs = parse_caption(text)
        attrs[attribute] = values[(values.index(attrs[attribute]) + 1) % len(values)]
        out.append(make_caption(**attrs))
    return out


@torch.no_grad()
def caption_reliance(denoise: CaptionDenoiser, latents: torch.Tensor, captions: Sequence[str],
                     logsnrs: Sequence[float], generator: torch.Generator | None = None) -> list[dict]:
    """Per log-SNR: the mean squared error of x_hat against the clean latents with the true
    captions (`true`), with each attribute changed (`wrong <attribute>`), and with the null text
    (`null`); and `increase`: by how much each attribute's change raises the error over `true`,
    as a fraction. Every variant sees the same noisy latents."""
    captions = list(captions)
    variants: dict[str, list[str] | None] = {"true": captions}
    variants |= {f"wrong {a}": changed_captions(captions, a) for a in ATTRIBUTES}
    variants["null"] = None
    rows = []
    for level in logsnrs:
        logsnr = torch.full((len(latents),), float(level), device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else None)
        z = diffuse(latents, logsnr, noise.to(latents.device))
        mse = {name: (denoise(z, logsnr, texts) - latents).square().mean().item() for name, texts in variants.items()}
        increase = {a: mse[f"wrong {a}"] / mse["true"] - 1 for a in ATTRIBUTES}
        rows.append({"logsnr": float(level), "mse": mse, "increase": increase})
    return rows


@torch.no_grad()
def attribute_identification(denoise: CaptionDenoiser, latents: torch.Tensor, captions: Sequence[str],
                             logsnrs: Sequence[float], generator: torch.Generator | None = None) -> list[dict]:
    """Per log-SNR: `accuracy`, per attribute the share of clips whose denoising error (the mean
    squared error of x_hat, per clip) is lowest under the clip's own value of that attribute,
    among all its values, with the other words of the caption kept. Every variant of a clip sees
    the same noisy latent; a tie counts as a miss, so a model that ignores the text scores 0."""
    captions = list(captions)
    truth = [parse_caption(text) for text in captions]
    rows = []
    for level in logsnrs:
        logsnr = torch.full((len(latents),), float(level), device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else None)
        z = diffuse(latents, logsnr, noise.to(latents.device))
        errors: dict[tuple[str, ...], torch.Tensor] = {}  # per caption list: [N]; the true one is shared

        def error(texts: list[str]) -> torch.Tensor:
            if tuple(texts) not in errors:
                errors[tuple(texts)] = (denoise(z, logsnr, texts) - latents).square().flatten(1).mean(1).cpu()
            return errors[tuple(texts)]

        accuracy = {}
        for attribute in ATTRIBUTES:
            values = attribute_values(attribute)
            per_value = torch.stack([error(with_value(captions, attribute, v)) for v in values])  # [V, N]
            own = torch.tensor([values.index(t[attribute]) for t in truth])
            best = per_value.min(0).values
            unique = (per_value == best).sum(0) == 1
            accuracy[attribute] = ((per_value.argmin(0) == own) & unique).float().mean().item()
        rows.append({"logsnr": float(level), "accuracy": accuracy})
    return rows


def model_caption_denoiser(model: DiffusionModel) -> CaptionDenoiser:
    """A base model's denoiser with its text encoder in front; None is the null text."""
    if model.config.stage != "base":
        raise ValueError(f"the caption probe takes a base model; this one is a {model.config.stage} stage, "
                         f"whose output depends on its low-resolution input more than on text")
    denoiser = model.denoiser()

    def denoise(z, logsnr, captions):
        text, mask = model.encode_text(captions if captions is not None else [""] * len(z))
        if captions is None:
            mask = torch.zeros_like(mask)
        return denoiser(z, logsnr, text=text, text_mask=mask).float()

    return denoise


def format_table(rows: list[dict]) -> str:
    head = "| log-SNR | MSE, true caption | " + " | ".join(f"wrong {a}" for a in ATTRIBUTES) + " | null text |"
    lines = [head, "|" + "---:|" * (len(ATTRIBUTES) + 3)]
    for row in rows:
        cells = [f"{row['mse'][f'wrong {a}']:.4f} ({100 * row['increase'][a]:+.1f}%)" for a in ATTRIBUTES]
        lines.append(f"| {row['logsnr']:g} | {row['mse']['true']:.4f} | " + " | ".join(cells)
                     + f" | {row['mse']['null']:.4f} |")
    return "\n".join(lines)


def format_identification(rows: list[dict]) -> str:
    lines = ["| log-SNR | " + " | ".join(ATTRIBUTES) + " |", "|" + "---:|" * (len(ATTRIBUTES) + 1)]
    for row in rows:
        lines.append(f"| {row['logsnr']:g} | " + " | ".join(f"{100 * row['accuracy'][a]:.0f}%" for a in ATTRIBUTES) + " |")
    return "\n".join(lines)


def probe_clips(cache_dir: str | Path, count: int) -> tuple[torch.Tensor, list[str]]:
    """`count` clips spread evenly over a latent cache (its first shape) and their captions;
    ValueError for a folder that is not a cache or captions outside the synthetic domain."""
    cache = LatentDataset(cache_dir)
    count = min(count, len(cache))
    items = [cache[(i * len(cache) // count, cache.shapes[0], 0)] for i in range(count)]
    captions = [item["caption"] for item in items]
    try:
        for text in captions:
            parse_caption(text)
    except ValueError as e:
        raise ValueError(f"{cache_dir}: {e}; the probe needs captions of the synthetic domain") from None
    return torch.stack([item["latent"] for item in items]), captions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_video.eval.caption_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a base model folder (train.py's export)")
    parser.add_argument("--latents", required=True, help="a latent cache of captioned synthetic clips at the model's size")
    parser.add_argument("--clips", type=int, default=64, help="clips spread over the cache (default: %(default)s)")
    parser.add_argument("--logsnr", type=float, nargs="+", default=[-4.0, -2.0, 0.0, 2.0],
                        help="noise levels (default: %(default)s)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="default: %(default)s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.clips < 1:
        raise UsageError("--clips must be >= 1")
    model = DiffusionModel.from_pretrained(args.model, args.weights)
    try:
        denoise = model_caption_denoiser(model)
        latents, captions = probe_clips(args.latents, args.clips)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rows = caption_reliance(denoise, latents, captions, args.logsnr, torch.Generator().manual_seed(args.seed))
    identified = attribute_identification(denoise, latents, captions, args.logsnr,
                                          torch.Generator().manual_seed(args.seed))
    print(f"{args.model} on {len(captions)} clips of {args.latents}: denoising MSE, and its increase with one "
          f"attribute of the caption changed\n")
    print(format_table(rows))
    print("\nShare of clips whose error is lowest under their own value of each attribute (chance: "
          + ", ".join(f"{a} {1 / len(attribute_values(a)):.0%}" for a in ATTRIBUTES) + ")\n")
    print(format_identification(identified))
    if args.json:
        figures = {"model": args.model, "clips": len(captions), "rows": rows, "identification": identified}
        write_text_atomic(Path(args.json), json.dumps(figures, indent=1) + "\n")

if __name__ == "__main__":
    main()
