"""The samplers on a 2D toy distribution, drawn into a PNG.

    python -m dit_video.toy2d configs/toy/samplers2d.yaml [key=value ...]

The data is a ring of eight Gaussians with unequal weights, whose exact denoiser E[x | z_t] is
known (`GaussianMixture`), so every difference from the data is the sampler's own error. The
figure shows, for each sampler (rows) and step count (columns), the samples over the data
density; then classifier-free guidance towards one class (the three upper modes) at each
`guidance_weights` entry, the unconditional denoiser being the whole ring's; and at the bottom
the sliced Wasserstein distance to fresh data against the step count. Beside the PNG it writes
the effective config (`<name>.yaml`) and the numbers (`<name>.json`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .cli import UsageError, check_output_path, exits_cleanly, parse_config_args
from .config import param, save_config
from .diffusion import CosineSchedule, GaussianMixture, classifier_free_guidance, sample
from .files import atomic_path, write_text_atomic

# Named sampler settings the figure can show, as keyword arguments of `sample`.
PRESETS = {
    "ddim": dict(sampler="ddim"),
    "ddim_eta1": dict(sampler="ddim", eta=1.0),
    "ancestral": dict(sampler="ancestral", gamma=0.0),
    "ancestral_gamma1": dict(sampler="ancestral", gamma=1.0),
    "pc": dict(sampler="pc", gamma=0.0, corrector_steps=1, delta=0.1),
}
Preset = Literal["ddim", "ddim_eta1", "ancestral", "ancestral_gamma1", "pc"]
GUIDED_CLASS = [1, 2, 3]  # the modes at 45, 90 and 135 degrees


@dataclass
class Toy2DConfig:
    out: str = "outputs/toy2d/samplers.png"
    samplers: list[Preset] = field(default_factory=lambda: ["ddim", "ancestral", "ancestral_gamma1", "pc"])
    steps: list[int] = param(default_factory=lambda: [4, 16, 64, 256], ge=1)
    guidance_weights: list[float] = param(default_factory=lambda: [0.0, 1.0, 3.0], ge=0)  # [] skips the row
    num_samples: int = param(4000, ge=16)
    seed: int = 0
    schedule: CosineSchedule = field(default_factory=CosineSchedule)

    def __post_init__(self):
        if not self.samplers or not self.steps:
            raise ValueError("samplers and steps must not be empty")
        if not self.out.endswith(".png"):
            raise ValueError(f"out must be a .png path, got {self.out!r}")


def ring_mixture(modes: int = 8, radius: float = 2.0) -> GaussianMixture:
    """Eight elongated Gaussians on a circle, weights 1..8 (normalized), so both the shapes and
    the mixture weights are visible in the samples."""
    angles = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    tangent = torch.stack([-angles.sin(), angles.cos()], dim=1)
    radial = means / radius
    covs = 0.12 * tangent[:, :, None] * tangent[:, None, :] + 0.015 * radial[:, :, None] * radial[:, None, :]
    weights = torch.arange(1, modes + 1, dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), means, covs)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Mean 1-Wasserstein distance of the two point sets' 1D projections over random directions."""
    n = min(len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = (a[:n].double() @ dirs).sort(dim=0).values
    pb = (b[:n].double() @ dirs).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def run(cfg: Toy2DConfig, progress: bool = True) -> dict:
    """Sample every (sampler, steps) pair; returns {"data": x, "samples": {...}, "distance": {...}}."""
    data = ring_mixture()
    gen = torch.Generator().manual_seed(cfg.seed)
    reference, _ = data.sample(cfg.num_samples, generator=gen)
    noise = torch.randn(cfg.num_samples, 2, generator=gen)
    samples, distance = {}, {}
    runs = [(name, steps) for name in cfg.samplers for steps in cfg.steps]
    for name, steps in tqdm(runs, desc="sampling", disable=not progress):
        x = sample(data.denoiser, noise, steps=steps, schedule=cfg.schedule,
                   generator=torch.Generator().manual_seed(cfg.seed + 1), **PRESETS[name])
        samples[name, steps] = x
        distance.setdefault(name, {})[steps] = sliced_wasserstein(x, reference)
    # The floor: the distance between two independent draws of the data itself.
    floor = sliced_wasserstein(data.sample(cfg.num_samples, generator=gen)[0], reference)
    guided, in_class = guidance_runs(data, noise, cfg)
    return {"mixture": data, "data": reference, "samples": samples, "distance": distance, "floor": floor,
            "class_data": data.restrict(GUIDED_CLASS).sample(cfg.num_samples, generator=gen)[0],
            "guided": guided, "in_class": in_class}


def guidance_runs(data: GaussianMixture, noise: torch.Tensor, cfg: Toy2DConfig) -> tuple[dict, dict]:
    """DDIM with classifier-free guidance towards GUIDED_CLASS at each weight, at the largest step
    count; returns the samples and the share of them that land in the class's modes."""
    upper = data.restrict(GUIDED_CLASS)

    def conditional(z: torch.Tensor, logsnr: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return torch.where(label[:, None].bool(), upper.denoiser(z, logsnr), data.denoiser(z, logsnr))

    cond, uncond = {"label": torch.ones(len(noise))}, {"label": torch.zeros(len(noise))}
    guided, in_class = {}, {}
    for w in cfg.guidance_weights:
        x = sample(classifier_free_guidance(conditional, w, cond, uncond), noise, steps=max(cfg.steps),
                   schedule=cfg.schedule)
        guided[w] = x
        in_class[w] = torch.isin(data.component_of(x), torch.tensor(GUIDED_CLASS)).double().mean().item()
    return guided, in_class


def draw(result: dict, cfg: Toy2DConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(cfg.samplers) + (1 if cfg.guidance_weights else 0)
    cols = max(len(cfg.steps), len(cfg.guidance_weights)) + 1
    height = 2.3 * rows + 2.8
    fig = plt.figure(figsize=(2.3 * cols, height), dpi=90)
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.25], hspace=0.35, wspace=0.08,
                            top=1 - 0.7 / height)
    lim = 3.0
    xs = torch.linspace(-lim, lim, 160, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    density = result["mixture"].log_prob_noisy(torch.stack([gx.flatten(), gy.flatten()], 1), torch.tensor(40.0))
    density = density.exp().reshape(gx.shape)

    def panel(r: int, c: int, points: torch.Tensor, title: str, color: str) -> None:
        ax = fig.add_subplot(grid[r, c])
        ax.contour(gx, gy, density, levels=4, colors="0.75", linewidths=0.6)
        ax.scatter(points[:, 0], points[:, 1], s=1.5, alpha=0.35, color=color, linewidths=0)
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
        ax.set_title(title, fontsize=8)

    for r, name in enumerate(cfg.samplers):
        panel(r, 0, result["data"], "data" if r == 0 else "", "black")
        fig.axes[-1].set_ylabel(name, fontsize=9)
        for c, steps in enumerate(cfg.steps, start=1):
            sw = result["distance"][name][steps]
            panel(r, c, result["samples"][name, steps], f"{steps} steps  SW {sw:.3f}", f"C{r}")
    if cfg.guidance_weights:
        r = len(cfg.samplers)
        panel(r, 0, result["class_data"], "data of the class", "black")
        fig.axes[-1].set_ylabel(f"CFG, ddim {max(cfg.steps)}", fontsize=9)
        for c, w in enumerate(cfg.guidance_weights, start=1):
            panel(r, c, result["guided"][w], f"w = {w:g}  in class {100 * result['in_class'][w]:.1f}%", "C5")

    ax = fig.add_subplot(grid[rows, :])
    for r, name in enumerate(cfg.samplers):
        ax.plot(cfg.steps, [result["distance"][name][s] for s in cfg.steps], "o-", color=f"C{r}", label=name)
    ax.axhline(result["floor"], color="0.5", ls="--", lw=1, label="data vs data")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="sliced Wasserstein to data")
    ax.set_xticks(cfg.steps, [str(s) for s in cfg.steps])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.legend(fontsize=8, ncols=min(5, len(cfg.samplers) + 1))
    fig.suptitle("Samplers and guidance with the exact denoiser of a 2D Gaussian mixture", fontsize=11,
                 y=1 - 0.2 / height)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config_args(Toy2DConfig, argv, "python -m dit_video.toy2d", __doc__.split("\n\n")[0])
    out = Path(cfg.out)
    check_output_path(out)
    result = run(cfg)
    metrics = {"sliced_wasserstein": result["distance"], "data_vs_data": result["floor"],
               "guidance_in_class": result["in_class"]}
    try:
        draw(result, cfg, out)
        save_config(cfg, out.with_suffix(".yaml"))
        write_text_atomic(out.with_suffix(".json"), json.dumps(metrics, indent=2) + "\n")
    except OSError as e:
        raise UsageError(f"{out}: cannot write ({e.strerror})") from None
    width = max(len(n) for n in cfg.samplers)
    print(f"{'sampler':<{width}}  " + "  ".join(f"{s:>7}" for s in cfg.steps) + "   (sliced Wasserstein to data)")
    for name in cfg.samplers:
        print(f"{name:<{width}}  " + "  ".join(f"{result['distance'][name][s]:7.4f}" for s in cfg.steps))
    print(f"data vs data floor: {result['floor']:.4f}\nwrote {out}")


if __name__ == "__main__":
    main()
