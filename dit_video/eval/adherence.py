"""Prompt adherence on the synthetic domain, judged from the pixels with no learned model.

A synthetic clip (`dit_video.data.synthetic`) is one colored shape moving in a straight line at
a constant speed over a plain background, so every word of its caption can be measured:

    detection = detect(video)            # video [3, T, H, W] in [-1, 1]
    detection.color, detection.shape, detection.direction, detection.background
    detection.consistency                 # how steady the object is over time (see Consistency)

    table = adherence_table(detections, prompts)    # prompts: captions or attribute dicts
    write_adherence_table(detections, prompts, "out/adherence")   # adherence.md + adherence.json

How `detect` reads a video (colors in [0, 1] RGB, the units of synthetic.COLORS):

1. Background: the per-channel median of a thin ring of border pixels over all frames, matched
   to the nearest BACKGROUNDS color. The object of a synthetic clip never touches the border.
   Where the ring's noise (a robust std, 1.4826 x the median absolute deviation) exceeds
   0.075, every frame is first averaged over 3x3 pixels: a third of the noise for a blur,
   which step 4 allows for.
2. Foreground: each pixel's RGB distance to that measured background. A noise floor (twice the
   90th percentile of the border's distances, at least 0.12) separates candidates from the
   background; the object's contrast is the 90th percentile of the candidates' distances, and
   the mask is every pixel farther than half of it (at least the floor): the half-coverage
   level of an antialiased edge. In each frame only the largest 8-connected blob is kept; a
   frame whose blob is smaller than max(4, 0.4% of the frame) pixels has no object, and a clip
   with an object in fewer than half its frames (or fewer than 2) is flagged `found=False`.
   The object's coverage of each pixel of the blob and two pixels around it is its distance
   over the contrast (less the background's own noise level), clipped to [0, 1]; the area and
   centroid are the coverage's sum and mean position, which move smoothly with the shape where
   a pixel count jumps.
3. Color: the per-channel median of the blob's core (distance at least 3/4 of the contrast)
   over all frames; the named color is the COLORS entry c whose mixture line from the
   background to c passes nearest to it, so that a blurred object, mixed with its background,
   still reads as its own color (plain nearest-color reads a blurred yellow on dark blue as red).
4. Shape: in each frame the coverage is compared with a circle, a square and a triangle
   (pointing up) of the same area and centroid, drawn by synthetic.shape_mask and blurred by
   each of BLURS: soft intersection-over-union sum(min) / sum(max), the best blur for each
   shape (a blurred square is a blurred square, not a circle). The clip's shape has the
   highest mean over the frames.
5. Direction: least-squares lines x(t), y(t) through the centroids; the clip's displacement is
   the slope times (T - 1) and its direction the sign of the larger component (y grows
   downward, so "up" is negative dy). A displacement under 2% of the frame's shorter side
   reads as standing still: direction None.

How far the judge can be trusted (blur, noise, H.264) is measured in tests/test_adherence.py;
the figures are in the README's evaluation section.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, shape_mask
from ..files import write_text_atomic
from .stats import proportion_interval

__all__ = ["ATTRIBUTES", "Consistency", "Detection", "adherence", "adherence_table", "detect", "detect_batch",
           "format_markdown", "parse_caption", "temporal_consistency", "write_adherence_table"]

ATTRIBUTES = ("shape", "color", "direction", "background")
MIN_FLOOR = 0.12          # the least RGB distance from the background that can count as foreground
CONTRAST_Q = 0.9          # the object's contrast: this quantile of the candidates' distances
CORE = 0.75               # core pixels: at least this fraction of the object's contrast
NOISY = 0.075             # background noise (std, [0, 1] units) above which frames are first smoothed 3x3
STILL = 0.02              # displacement (fraction of the shorter side) below which nothing moves
# Tolerances of Consistency.score: the level of each measure at which its factor is 1/e.
AREA_TOL, COLOR_TOL, PATH_TOL = 0.1, 0.1, 0.02
ON_PATH = 0.03            # a frame is on the path when its centroid is this close to the line (of the shorter side)


@dataclass
class Consistency:
    """How steady the detected object is over the frames where it was found.

    presence: fraction of the frames with an object, in [0, 1].
    shape_agreement: fraction of those frames whose best-matching template is the clip's
        shape, in [0, 1].
    area_cv: coefficient of variation (population std / mean) of the object's area (the
        coverage's sum, in pixels); 0 for a constant size. A rendered clip gives about 0.01 at
        64x64 and 0.02 at 32x32 (the renderer's own aliasing).
    color_drift: root-mean-square RGB distance (in [0, 1] units; the palette's closest pair
        of object colors, red and yellow, is 0.75 apart) of each frame's median core color
        from their mean. 0 for a rendered clip; noise of std 0.1 gives about 0.01 to 0.03, a
        3x3 blur of a small object up to 0.06 (its core mixes with the background).
    path_rmse_px: root-mean-square distance in pixels of the centroids from the least-squares
        constant-velocity line x = a + b t, y = c + d t: a curved path, a change of speed and
        frames out of order all raise it. About 0.07 pixels for a rendered clip.
    path_rmse: path_rmse_px divided by the frame's shorter side.
    on_path: fraction of the frames with an object whose centroid lies within ON_PATH (3%) of
        the shorter side from that line (2 pixels at 64x64): 1 for a rendered clip.
    score: one summary in [0, 1]: presence * shape_agreement * exp(-area_cv / 0.1)
        * exp(-color_drift / 0.1) * exp(-path_rmse / 0.02) (each tolerance the level at which
        its factor is 1/e). A rendered clip scores about 0.95 at 64x64 (0.85 at least) and 0.9
        at 32x32 (0.74 at least), where the area and path terms see the pixel grid; shuffled
        frames score near 0.
    """

    presence: float
    shape_agreement: float
    area_cv: float
    color_drift: float
    path_rmse_px: float
    path_rmse: float
    on_path: float
    score: float

    def to_dict(self) -> dict[str, float]:
        return {k: _finite_or_none(v) for k, v in self.__dict__.items()}


@dataclass
class Detection:
    """What `detect` read from one video [3, T, H, W].

    found: an object was seen in at least half of the frames (and at least 2, or the one frame
        of an image). When False, color, shape and direction are None; background is always read.
    color, shape, direction, background: names as in dit_video.data.synthetic (or None).
    present [T] bool: frames with an object.
    centroid [T, 2]: (x, y) in pixels, x to the right and y down, pixel centers at i + 0.5
        (synthetic.shape_mask's coordinates); NaN where no object.
    area [T]: the object's area in pixels, the sum of its coverage (0 where none).
    fg_color [T, 3]: per-channel median RGB in [0, 1] of the object's core (NaN where none).
    shape_iou [T, 3]: soft intersection-over-union of the object with a template of each of
        SHAPES (same area and centroid, best blur); NaN where no object.
    velocity: (vx, vy) in pixels per frame from the least-squares fit (NaN without 2 frames).
    object_rgb, background_rgb: the measured colors, RGB in [0, 1] (object_rgb None if none found).
    contrast: the object's RGB distance from the background, [0, 1] units (0 if none found).
    frame_size: (H, W) of the video.
    consistency: temporal_consistency(self), or None when no object was found.
    """

    found: bool
    color: str | None
    shape: str | None
    direction: str | None
    background: str
    present: torch.Tensor
    centroid: torch.Tensor
    area: torch.Tensor
    fg_color: torch.Tensor
    shape_iou: torch.Tensor
    velocity: tuple[float, float]
    object_rgb: tuple[float, float, float] | None
    background_rgb: tuple[float, float, float]
    contrast: float
    frame_size: tuple[int, int]
    consistency: Consistency | None = field(default=None)

    @property
    def attributes(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        """The verdicts and summary numbers (no per-frame tensors), JSON-ready."""
        return {"found": self.found, **self.attributes,
                "velocity": [_finite_or_none(v) for v in self.velocity],
                "object_rgb": None if self.object_rgb is None else [round(c, 4) for c in self.object_rgb],
                "background_rgb": [round(c, 4) for c in self.background_rgb],
                "contrast": round(self.contrast, 4),
                "consistency": None if self.consistency is None else self.consistency.to_dict()}


def detect(video: torch.Tensor) -> Detection:
    """Read the color, shape, direction and background of the synthetic clip `video`
    [3, T, H, W] in [-1, 1] (values outside are clamped); H and W at least 16. See the module
    docstring for how."""
    if video.ndim != 4 or video.shape[0] != 3 or video.shape[1] < 1:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
    frames, height, width = video.shape[1:]
    if min(height, width) < 16:
        raise ValueError(f"frames must be at least 16x16 pixels to judge, got {height}x{width}")
    rgb = (video.detach().float().cpu().clamp(-1, 1) + 1) / 2  # [3, T, H, W] in [0, 1]

    ring = _border_ring(height, width)
    border = rgb[:, :, ring].flatten(1)
    bg = border.median(dim=1).values  # [3]
    noise = 1.4826 * (border - bg.unsqueeze(1)).abs().median(dim=1).values.mean().item()  # robust std
    if noise > NOISY:  # trade the noise for a blur, which the shape templates allow for
        rgb = F.avg_pool2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    background = _nearest(bg, BACKGROUNDS)
    dist = (rgb - bg.view(3, 1, 1, 1)).square().sum(0).sqrt()  # [T, H, W]
    floor = max(MIN_FLOOR, 2 * torch.quantile(dist[:, ring].flatten(), 0.9).item())
    min_area = max(4.0, 0.004 * height * width)

    candidates = dist[dist > floor]
    contrast = torch.quantile(candidates, CONTRAST_Q).item() if candidates.numel() >= min_area else 0.0
    mask = dist > max(floor, contrast / 2) if contrast else torch.zeros_like(dist, dtype=torch.bool)
    mask = _largest_blob(mask)
    present = mask.sum(dim=(1, 2)) >= min_area
    mask &= present.view(-1, 1, 1)
    found = int(present.sum()) >= (1 if frames == 1 else max(2, math.ceil(frames / 2)))

    # area and centroid from the coverage dist / contrast over the blob and its rim: steadier
    # than counting pixels (an antialiased edge moves smoothly, a pixel count jumps)
    support = _max3x3(_max3x3(mask.float()))  # the blob and two pixels around it
    level = dist[:, ring].median().item()  # what the background's own noise adds to the distance
    coverage = ((dist - level) / (contrast - level)).clamp(0, 1) * support if contrast else support
    area = coverage.sum((1, 2))
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    centroid = torch.stack([(coverage * xs).sum((1, 2)), (coverage * ys).sum((1, 2))], dim=1) / area.unsqueeze(1)
    core = mask & (dist >= CORE * contrast)
    core = torch.where(core.flatten(1).any(1).view(-1, 1, 1), core, mask)  # a frame with no core: its whole blob
    per_pixel = torch.where(core.unsqueeze(0), rgb, float("nan")).flatten(2)  # [3, T, H*W]
    fg_color = per_pixel.nanmedian(dim=2).values.T  # [T, 3], NaN where none
    nan = torch.full((frames, 1), float("nan"))
    centroid = torch.where(present.unsqueeze(1), centroid, nan)
    fg_color = torch.where(present.unsqueeze(1), fg_color, nan)
    area = area * present

    shape_iou = torch.full((frames, len(SHAPES)), float("nan"))
    if present.any():
        shape_iou[present] = _template_iou(coverage[present], centroid[present], area[present])
    velocity = _line_fit(centroid, present)[0] if int(present.sum()) >= 2 else (float("nan"), float("nan"))

    color = shape = direction = object_rgb = None
    if found:
        object_rgb = tuple(rgb[:, core].median(dim=1).values.tolist())
        color = _nearest_mixture(torch.tensor(object_rgb), bg, COLORS)
        shape = SHAPES[int(shape_iou[present].mean(0).argmax())]
        direction = _direction(velocity, frames, min(height, width))
    detection = Detection(found=found, color=color, shape=shape, direction=direction, background=background,
                          present=present, centroid=centroid, area=area, fg_color=fg_color, shape_iou=shape_iou,
                          velocity=velocity, object_rgb=object_rgb, background_rgb=tuple(bg.tolist()),
                          contrast=contrast if found else 0.0, frame_size=(height, width))
    detection.consistency = temporal_consistency(detection) if found else None
    return detection


def detect_batch(videos: torch.Tensor | Iterable[torch.Tensor]) -> list[Detection]:
    """`detect` on each video of a batch [B, 3, T, H, W] (or an iterable of [3, T, H, W])."""
    if isinstance(videos, torch.Tensor) and videos.ndim != 5:
        raise ValueError(f"expected videos [B, 3, T, H, W], got shape {tuple(videos.shape)}")
    return [detect(v) for v in videos]


def temporal_consistency(detection: Detection) -> Consistency:
    """The Consistency figures of a detection (see Consistency); all NaN, presence and score 0,
    when no frame has an object."""
    present = detection.present
    if not present.any():
        nan = float("nan")
        return Consistency(0.0, 0.0, nan, nan, nan, nan, 0.0, 0.0)
    presence = present.float().mean().item()
    best = detection.shape_iou[present].argmax(dim=1)
    shape = detection.shape if detection.shape is not None else SHAPES[int(best.mode().values)]
    agreement = (best == SHAPES.index(shape)).float().mean().item()
    area = detection.area[present]
    area_cv = (area.std(correction=0) / area.mean()).item()
    colors = detection.fg_color[present]
    color_drift = (colors - colors.mean(0)).norm(dim=1).square().mean().sqrt().item()
    side = min(detection.frame_size)
    if int(present.sum()) >= 2:
        _, residual = _line_fit(detection.centroid, present)
        distance = residual.norm(dim=1)
        path_px = distance.square().mean().sqrt().item()
        on_path = (distance <= ON_PATH * side).float().mean().item()
    else:
        path_px, on_path = 0.0, 1.0
    path = path_px / side
    score = presence * agreement * math.exp(-area_cv / AREA_TOL - color_drift / COLOR_TOL - path / PATH_TOL)
    return Consistency(presence=presence, shape_agreement=agreement, area_cv=area_cv, color_drift=color_drift,
                       path_rmse_px=path_px, path_rmse=path, on_path=on_path, score=score)


# ------------------------------------------------------------------------------------- adherence


_CAPTION = re.compile(
    r"^an? (?P<color>{c}) (?P<shape>{s}) moving (?P<direction>{d}) on an? (?P<background>{b}) background\.?$".format(
        c="|".join(map(re.escape, COLORS)), s="|".join(map(re.escape, SHAPES)),
        d="|".join(map(re.escape, DIRECTIONS)), b="|".join(map(re.escape, BACKGROUNDS))))


def parse_caption(text: str) -> dict[str, str]:
    """The attributes of a synthetic caption ("a red circle moving right on a gray background"),
    as a dict with keys ATTRIBUTES; ValueError if it is not one."""
    match = _CAPTION.match(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"not a synthetic caption (\"a <color> <shape> moving <direction> on a "
                         f"<background> background\"): {text!r}")
    return {name: match[name] for name in ATTRIBUTES}


def _target(target: str | Mapping[str, Any]) -> dict[str, str]:
    """A caption, or a dict with some of ATTRIBUTES (other keys, as in a manifest line, are
    ignored; a dict with none of them but a "caption" is read from the caption)."""
    if isinstance(target, str):
        return parse_caption(target)
    attrs = {k: str(target[k]) for k in ATTRIBUTES if k in target}
    if not attrs and "caption" in target:
        return parse_caption(target["caption"])
    if not attrs:
        raise ValueError(f"a target needs a caption or some of {', '.join(ATTRIBUTES)}; got keys {sorted(target)}")
    return attrs


def _scored(detections: Sequence[Detection], targets: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} detections but {len(targets)} targets")
    rows = []
    for detection, target in zip(detections, targets):
        want = _target(target)
        correct = {k: detection.attributes[k] == v for k, v in want.items()}
        rows.append({"target": want, "detected": detection.attributes, "correct": correct,
                     "all": all(correct.values())})
    return rows


def _accuracy(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Per attribute: the fraction right among the rows whose target names it (None if none
    does); "all": the fraction with every named attribute right."""
    out: dict[str, float | None] = {}
    for name in ATTRIBUTES:
        hits = [r["correct"][name] for r in rows if name in r["correct"]]
        out[name] = sum(hits) / len(hits) if hits else None
    out["all"] = sum(r["all"] for r in rows) / len(rows) if rows else None
    return out


def _intervals(rows: list[dict[str, Any]], confidence: float = 0.95) -> dict[str, list[float] | None]:
    """Per attribute (and "all"): the Wilson interval [lo, hi] of the accuracy `_accuracy` gives."""
    out: dict[str, list[float] | None] = {}
    for name in ATTRIBUTES:
        hits = [r["correct"][name] for r in rows if name in r["correct"]]
        out[name] = list(proportion_interval(sum(hits), len(hits), confidence)) if hits else None
    out["all"] = list(proportion_interval(sum(r["all"] for r in rows), len(rows), confidence)) if rows else None
    return out


def adherence(detections: Sequence[Detection], targets: Sequence[str | Mapping[str, Any]]) -> dict[str, float | None]:
    """Per-attribute accuracy of `detections` against `targets` (captions, or dicts with some
    of ATTRIBUTES such as manifest lines): {"shape": ..., "color": ..., "direction": ...,
    "background": ..., "all": ...}, fractions in [0, 1]; an attribute that no target names is
    None. A clip with no object found has its shape, color and direction wrong."""
    return _accuracy(_scored(detections, targets))


def attribute_values(attribute: str) -> list[str]:
    """The values of an attribute in the synthetic domain, in its order."""
    return list({"shape": SHAPES, "color": COLORS, "direction": DIRECTIONS, "background": BACKGROUNDS}[attribute])


def adherence_table(detections: Sequence[Detection], targets: Sequence[str | Mapping[str, Any]]) -> dict[str, Any]:
    """Everything `write_adherence_table` writes, as a JSON-ready dict:

    clips: how many; no_object: how many had no object found;
    accuracy: `adherence` over all clips; interval: the 95% Wilson interval [lo, hi] of each;
    per_value: {attribute: {value: {"clips": n, "accuracy": {...}, "interval": {...}}}} -- the
        same over the clips whose target has that value (so per_value["color"]["red"]["accuracy"]
        ["color"] is how often a red object is read as red, and ...["shape"] how often its shape
        is right);
    consistency: the mean of each Consistency figure over the clips with an object (None if none);
    results: one row a clip: its target, what was detected, which attributes are right, and
        the detection's summary (Detection.to_dict).
    """
    rows = _scored(detections, targets)
    per_value: dict[str, dict[str, Any]] = {}
    for name in ATTRIBUTES:
        seen = {r["target"][name] for r in rows if name in r["target"]}
        if not seen:
            continue
        order = [v for v in attribute_values(name) if v in seen] + sorted(seen - set(attribute_values(name)))
        per_value[name] = {}
        for value in order:
            subset = [r for r in rows if r["target"].get(name) == value]
            per_value[name][value] = {"clips": len(subset), "accuracy": _accuracy(subset),
                                      "interval": _intervals(subset)}
    measured = [d.consistency for d in detections if d.consistency is not None]
    names = list(Consistency.__dataclass_fields__)
    consistency = {n: (_finite_or_none(sum(getattr(c, n) for c in measured) / len(measured)) if measured else None)
                   for n in names}
    results = [{**row, "detection": d.to_dict()} for row, d in zip(rows, detections)]
    for r in results:
        del r["detected"]  # in r["detection"] too
    return {"clips": len(rows), "no_object": sum(not d.found for d in detections), "accuracy": _accuracy(rows),
            "interval": _intervals(rows), "per_value": per_value, "consistency": consistency, "results": results}


def format_markdown(table: Mapping[str, Any], title: str = "Prompt adherence") -> str:
    """The Markdown page of an `adherence_table`: accuracy overall and per target value, then
    the mean temporal-consistency figures."""
    columns = [n for n in ATTRIBUTES if table["accuracy"][n] is not None] + ["all"]

    def cells(entry: Mapping[str, Any]) -> str:
        acc, interval = entry["accuracy"], entry.get("interval") or {}
        return " | ".join("-" if acc[c] is None else f"{100 * acc[c]:.1f}%" + (
            f" ({100 * interval[c][0]:.0f}-{100 * interval[c][1]:.0f})" if interval.get(c) else "") for c in columns)

    lines = [f"# {title}", "",
             (f"{table['clips']} clips, judged from their pixels (dit_video.eval.adherence); "
              f"no object found in {table['no_object']}. Each row gives the accuracy of every attribute "
              f"over the clips whose prompt names that value, with its 95% confidence interval (Wilson) in "
              f"brackets."), "",
             "| prompt | clips | " + " | ".join(columns) + " |",
             "|---|---:|" + "---:|" * len(columns),
             f"| all | {table['clips']} | {cells(table)} |"]
    for name, values in table["per_value"].items():
        for value, entry in values.items():
            lines.append(f"| {name} = {value} | {entry['clips']} | {cells(entry)} |")
    meaning = {"presence": "fraction of frames with the object",
               "shape_agreement": "fraction of those frames showing the clip's shape",
               "area_cv": "coefficient of variation of the object's area",
               "color_drift": "RMS change of the object's color (RGB in [0, 1])",
               "path_rmse_px": "RMS distance of the centroid from a constant-velocity line (pixels)",
               "path_rmse": "the same, as a fraction of the frame's shorter side",
               "on_path": "fraction of frames within 3% of the shorter side of that line",
               "score": "summary in [0, 1] (see Consistency)"}
    lines += ["", "Temporal consistency, mean over the clips with an object:", "",
              "| measure | mean | meaning |", "|---|---:|---|"]
    for name, value in table["consistency"].items():
        lines.append(f"| {name} | {'-' if value is None else f'{value:.4g}'} | {meaning.get(name, '')} |")
    return "\n".join(lines) + "\n"


def write_adherence_table(detections: Sequence[Detection], targets: Sequence[str | Mapping[str, Any]],
                          path: str | os.PathLike, title: str = "Prompt adherence") -> tuple[Path, Path]:
    """Write `path`.md (format_markdown) and `path`.json (adherence_table) atomically; a
    ".md" or ".json" ending of `path` is dropped first. Returns the two paths."""
    path = Path(path)
    if path.suffix in (".md", ".json"):
        path = path.with_suffix("")
    table = adherence_table(detections, targets)
    md, js = path.parent / (path.name + ".md"), path.parent / (path.name + ".json")
    write_text_atomic(js, json.dumps(table, indent=1) + "\n")
    write_text_atomic(md, format_markdown(table, title))
    return md, js


# --------------------------------------------------------------------------------------- helpers


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _nearest(rgb: torch.Tensor, palette: Mapping[str, tuple[float, float, float]]) -> str:
    names = list(palette)
    distances = (torch.tensor([palette[n] for n in names]) - rgb).norm(dim=1)
    return names[int(distances.argmin())]


def _nearest_mixture(rgb: torch.Tensor, background: torch.Tensor,
                     palette: Mapping[str, tuple[float, float, float]]) -> str:
    """The palette color c whose segment from `background` to c passes nearest to `rgb`: a pixel
    that a blur or an antialiased edge mixes with the background, b + a (c - b) with a < 1, still
    reads as c (the palette's directions from every background are at least 33 degrees apart)."""
    names = list(palette)
    colors = torch.tensor([palette[n] for n in names])
    along = colors - background
    a = ((rgb - background) * along).sum(1) / along.square().sum(1)
    distances = (background + a.clamp(0, 1).unsqueeze(1) * along - rgb).norm(dim=1)
    return names[int(distances.argmin())]


def _border_ring(height: int, width: int) -> torch.Tensor:
    """[H, W] bool: the outer min(H, W) // 32 (at least 1) rows and columns."""
    w = max(1, min(height, width) // 32)
    ring = torch.ones(height, width, dtype=torch.bool)
    ring[w:-w, w:-w] = False
    return ring


def _largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """[T, H, W] bool -> the largest 8-connected component of each frame (ties: either)."""
    if not mask.any():
        return mask
    rows, cols = mask.any(2).any(0).nonzero().squeeze(1), mask.any(1).any(0).nonzero().squeeze(1)
    box = (slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    crop = mask[box]  # the work is in the box that holds every frame's foreground
    frames, height, width = crop.shape
    ids = torch.arange(1, height * width + 1, dtype=torch.float32).view(1, height, width)  # exact below 2^24
    labels = torch.where(crop, ids, 0.0)
    while True:  # every pixel takes its neighbourhood's largest label until nothing changes
        spread = _max3x3(labels) * crop
        if torch.equal(spread, labels):
            break
        labels = spread
    labels = labels.long()
    offsets = torch.arange(frames).view(-1, 1, 1) * (height * width + 1)
    counts = torch.bincount((labels + offsets).flatten(), minlength=frames * (height * width + 1))
    counts = counts.view(frames, -1)
    counts[:, 0] = 0
    out = torch.zeros_like(mask)
    out[box] = crop & (labels == counts.argmax(dim=1).view(-1, 1, 1))
    return out


def _max3x3(planes: torch.Tensor) -> torch.Tensor:
    """[T, H, W]: the largest value of each pixel's 3x3 neighbourhood (zero beyond the edges),
    as two separable passes of shifted maxima: many times faster than max_pool2d on one channel."""
    p = F.pad(planes, (1, 1, 1, 1))
    rows = torch.maximum(torch.maximum(p[:, :-2], p[:, 1:-1]), p[:, 2:])
    return torch.maximum(torch.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


@functools.lru_cache(maxsize=1)
def _unit_templates() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Each of SHAPES drawn large by synthetic.shape_mask: ([3, N, N] coverage, [3] area / r^2,
    [3, 2] centroid offset from the shape's center / r, its reach from its centroid / r, r)."""
    radius, size = 64.0, 192
    center = size / 2
    coords = torch.arange(size) + 0.5
    masks, areas, offsets, reach = [], [], [], 0.0
    for shape in SHAPES:
        m = shape_mask(shape, (center, center), radius, size, supersample=2)
        total = m.sum()
        cx, cy = (m.sum(0) * coords).sum() / total, (m.sum(1) * coords).sum() / total
        inside = m > 0
        ys, xs = inside.nonzero(as_tuple=True)
        reach = max(reach, ((xs + 0.5 - cx).abs().max() + 1).item(), ((ys + 0.5 - cy).abs().max() + 1).item())
        masks.append(m)
        areas.append(total / radius**2)
        offsets.append(torch.stack([cx - center, cy - center]) / radius)
    return torch.stack(masks), torch.stack(areas), torch.stack(offsets), reach / radius, radius


BLURS = (0.0, 0.5, 0.8, 1.2, 1.6)  # Gaussian blurs (std in pixels) that the templates are tried with


def _template_iou(coverage: torch.Tensor, centroid: torch.Tensor, area: torch.Tensor,
                  supersample: int = 2) -> torch.Tensor:
    """[N, 3]: how well each frame's object coverage [N, H, W] (in [0, 1]) matches each of
    SHAPES drawn with the same area and centroid: the soft intersection-over-union
    sum(min) / sum(max), the best over the template blurred by each of BLURS, so that a
    blurred square is still a square and not a circle."""
    templates, unit_area, unit_offset, unit_reach, big_r = _unit_templates()
    n, height, width = coverage.shape
    size = templates.shape[-1]
    radius = (area.view(n, 1) / unit_area.view(1, 3)).sqrt()  # [N, 3]: each shape's radius for this area
    xs = torch.arange(width) + 0.5
    ys = torch.arange(height) + 0.5
    on = coverage > 0
    spread_x = ((xs - centroid[:, :1]).abs() * on.any(1)).amax(1)
    spread_y = ((ys - centroid[:, 1:]).abs() * on.any(2)).amax(1)
    margin = math.ceil(3 * max(BLURS))
    reach = torch.maximum(torch.maximum(spread_x, spread_y), radius.amax(1) * unit_reach + margin).max().item()
    window = 2 * math.ceil(reach) + 4
    origin = centroid.floor().long() - window // 2  # [N, 2] integer corner of each frame's window
    # the coverage in the window (zero outside the frame)
    steps = torch.arange(window)
    iy, ix = origin[:, 1:] + steps, origin[:, :1] + steps  # [N, window]
    valid = ((iy >= 0) & (iy < height)).unsqueeze(2) & ((ix >= 0) & (ix < width)).unsqueeze(1)
    observed = coverage[torch.arange(n).view(-1, 1, 1), iy.clamp(0, height - 1).unsqueeze(2),
                        ix.clamp(0, width - 1).unsqueeze(1)] * valid
    # the templates' coverage: supersample^2 points a pixel sampled from the large drawings
    sub = (torch.arange(window * supersample) + 0.5) / supersample
    center = centroid.unsqueeze(1) - unit_offset.unsqueeze(0) * radius.unsqueeze(2)  # [N, 3, 2] shape centers
    scale = (big_r / radius).unsqueeze(2)  # [N, 3, 1]
    gx = (origin[:, None, :1] + sub - center[..., :1]) * scale + size / 2  # [N, 3, window * s], template pixels
    gy = (origin[:, None, 1:] + sub - center[..., 1:]) * scale + size / 2
    grid = torch.stack(torch.broadcast_tensors(gx.unsqueeze(2), gy.unsqueeze(3)), dim=-1) * (2 / size) - 1
    # one batch entry a shape, the frames' windows stacked along the height
    grid = grid.transpose(0, 1).reshape(3, n * window * supersample, window * supersample, 2)
    drawn = F.grid_sample(templates.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    drawn = F.avg_pool2d(drawn, supersample).view(3, n, window, window).transpose(0, 1)  # [N, 3, window, window]
    blurs = torch.stack([_blur_matrix(window, sigma) for sigma in BLURS])  # [B, window, window]
    blurred = blurs @ drawn.unsqueeze(2) @ blurs.transpose(1, 2)  # [N, 3, B, window, window]
    seen = observed.view(n, 1, 1, window, window)
    inter = torch.minimum(blurred, seen).sum((3, 4))
    union = torch.maximum(blurred, seen).sum((3, 4)).clamp(min=1e-6)
    return (inter / union).amax(dim=2)


def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """[size, size] M such that M @ X @ M.T is X filtered with a normalized Gaussian of std
    `sigma` (zero beyond the edges); the identity for sigma 0."""
    if sigma == 0:
        return torch.eye(size)
    offsets = torch.arange(size, dtype=torch.float32)
    taps = torch.exp(-(offsets.view(-1, 1) - offsets).square() / (2 * sigma**2))
    return taps / taps[size // 2].sum()  # the middle row's kernel fits inside: it sums to 1


def _line_fit(centroid: torch.Tensor, present: torch.Tensor) -> tuple[tuple[float, float], torch.Tensor]:
    """Least-squares constant-velocity fit of the present frames' centroids: ((vx, vy) in
    pixels per frame, [P, 2] residuals in pixels)."""
    t = present.nonzero().squeeze(1).double()
    points = centroid[present].double()
    design = torch.stack([torch.ones_like(t), t], dim=1)
    coef = torch.linalg.lstsq(design, points).solution  # [2, 2]: rows intercept, velocity
    residual = (points - design @ coef).float()
    return (coef[1, 0].item(), coef[1, 1].item()), residual


def _direction(velocity: tuple[float, float], frames: int, side: int) -> str | None:
    if not all(math.isfinite(v) for v in velocity):
        return None
    dx, dy = (v * (frames - 1) for v in velocity)
    if max(abs(dx), abs(dy)) < STILL * side:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"
