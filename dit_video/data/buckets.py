"""Shape buckets and the sampler that draws batches from them, the same way on every rank.

Sora-style training keeps every clip at a native size, and a batch needs one shape: each batch
is drawn from one bucket (frames, height, width, batch size). The draw is a pure function of
the seed and the batch number, and each kind (video, image) walks through a fresh permutation
of its data each epoch, so:

- every rank draws the same bucket for batch n, and rank r takes its slice of the global batch;
- the state is a few integers (batches drawn, position in each kind's stream), the same on
  every rank, and resuming from it continues the exact stream without replaying anything.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from ..config import param
from .dataset import Shape

__all__ = ["BucketConfig", "Batch", "BucketSampler"]

KINDS = ("video", "image")


@dataclass
class BucketConfig:
    """One entry of a config's bucket list."""

    frames: int = param(ge=1)  # 1 for image buckets; for videos the VAE's 1 + f*k
    height: int = param(ge=1)
    width: int = param(ge=1)
    batch_size: int = param(ge=1)  # per process; the global batch is batch_size * world
    weight: float = param(1.0, gt=0)  # relative sampling weight among the buckets of its kind


@dataclass
class Batch:
    """This rank's share of one global batch: dataset keys `(index, shape, item_seed)`."""

    shape: Shape
    kind: Literal["video", "image"]
    keys: list[tuple[int, Shape, int]]


def _mix(*parts: int | str) -> int:
    """A 64-bit seed from `parts`, the same in every process and Python version (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


class BucketSampler:
    """An infinite stream of this rank's batches.

    Batch n is a video batch or, with probability `image_ratio`, an image batch, from a bucket of
    that kind drawn by weight. A global batch takes the next `batch_size * world` positions of
    its kind's stream, which is the concatenation of one permutation per epoch seeded by
    (seed, kind, epoch) (a batch may run over into the next epoch); rank r takes positions
    [r * batch_size, (r + 1) * batch_size) of them. An item's seed (its clip's start frame) comes
    from (seed, kind, position).
    """

    def __init__(self, video_count: int, image_count: int, video_buckets: list[BucketConfig],
                 image_buckets: list[BucketConfig], image_ratio: float, seed: int, rank: int = 0, world: int = 1):
        self.counts = {"video": video_count, "image": image_count}
        self.buckets = {"video": list(video_buckets), "image": list(image_buckets)}
        _validate(self.counts, self.buckets, image_ratio)
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.image_ratio, self.seed, self.rank, self.world = image_ratio, seed, rank, world
        self.batches = 0  # batches drawn so far
        self.positions = {kind: 0 for kind in KINDS}  # items of each kind drawn so far, over all ranks
        self._permutation: dict[str, tuple[int, np.ndarray]] = {}  # kind -> (epoch, its permutation)

    def __iter__(self) -> Iterator[Batch]:
        """Batches from the current state on; drawing one advances the state."""
        while True:
            yield self._draw()

    def _draw(self) -> Batch:
        rng = random.Random(_mix(self.seed, "batch", self.batches))
        kind = "image" if rng.random() < self.image_ratio else "video"
        bucket = rng.choices(self.buckets[kind], weights=[b.weight for b in self.buckets[kind]])[0]
        shape = Shape(bucket.frames, bucket.height, bucket.width)
        first = self.positions[kind] + self.rank * bucket.batch_size
        positions = range(first, first + bucket.batch_size)
        keys = [(self._index(kind, p), shape, _mix(self.seed, kind, p)) for p in positions]
        self.positions[kind] += bucket.batch_size * self.world
        self.batches += 1
        return Batch(shape, kind, keys)

    def _index(self, kind: str, position: int) -> int:
        epoch, offset = divmod(position, self.counts[kind])
        if kind not in self._permutation or self._permutation[kind][0] != epoch:
            rng = np.random.default_rng(_mix(self.seed, kind, "epoch", epoch))
            self._permutation[kind] = epoch, rng.permutation(self.counts[kind])
        return int(self._permutation[kind][1][offset])

    def state_dict(self) -> dict:
        """Where the stream stands; the same on every rank, and valid for any rank and world size."""
        return {"batches": self.batches, "positions": dict(self.positions), "seed": self.seed,
                "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. A different seed or data size would not continue the same stream,
        so it is an error rather than a silent restart."""
        if state["seed"] != self.seed or state["counts"] != self.counts:
            raise ValueError(f"sampler state is for seed {state['seed']} and counts {state['counts']}, "
                             f"this sampler has seed {self.seed} and counts {self.counts}")
        self.batches = state["batches"]
        self.positions = dict(state["positions"])

    def describe(self, accumulate: int = 1) -> str:
        """The buckets as a table: per-process and global batch, weight, and share of batches.
        With gradient accumulation an optimizer step takes `accumulate` batches, each of one
        bucket: the global batch of a step whose batches share a bucket is batch x world x that."""
        per_step = f" x accumulate {accumulate}" if accumulate > 1 else ""
        lines = [f"buckets: {self.counts['video']} videos, {self.counts['image']} images, "
                 f"image_ratio {self.image_ratio:g}, world {self.world} "
                 f"(batch: per process, global: batch x world{per_step}, share: of all batches)",
                 f"{'kind':<6}{'frames':>7}{'height':>7}{'width':>7}{'batch':>7}{'global':>8}{'weight':>8}{'share':>8}"]
        for kind in KINDS:
            kind_share = self.image_ratio if kind == "image" else 1 - self.image_ratio
            total = sum(b.weight for b in self.buckets[kind])
            for b in self.buckets[kind]:
                lines.append(f"{kind:<6}{b.frames:>7}{b.height:>7}{b.width:>7}{b.batch_size:>7}"
                             f"{b.batch_size * self.world * accumulate:>8}{b.weight:>8g}"
                             f"{kind_share * b.weight / total:>8.1%}")
        return "\n".join(lines)


def _validate(counts: dict[str, int], buckets: dict[str, list[BucketConfig]], image_ratio: float) -> None:
    """One-line errors for buckets or a ratio that the data cannot honour."""
    if not 0 <= image_ratio <= 1:
        raise ValueError(f"image_ratio must be in [0, 1], got {image_ratio}")
    for kind in KINDS:
        if counts[kind] < 0:
            raise ValueError(f"{kind} count must be >= 0, got {counts[kind]}")
        if bool(counts[kind]) != bool(buckets[kind]):
            raise ValueError(f"{counts[kind]} {kind}s and {len(buckets[kind])} {kind} buckets: "
                             f"{kind}s need buckets and buckets need {kind}s")
        for i, b in enumerate(buckets[kind]):
            if min(b.frames, b.height, b.width, b.batch_size) < 1 or not (b.weight > 0 and math.isfinite(b.weight)):
                raise ValueError(f"{kind} bucket {i}: need frames, height, width, batch_size >= 1 and a finite "
                                 f"weight > 0, got {b}")
            if kind == "image" and b.frames != 1:
                raise ValueError(f"image bucket {i}: an image has 1 frame, got frames={b.frames}")
    if not counts["video"] and not counts["image"]:
        raise ValueError("no data: need videos or images")
    if not counts["image"] and image_ratio != 0:
        raise ValueError(f"image_ratio={image_ratio} but there are no images")
    if not counts["video"] and image_ratio != 1:
        raise ValueError(f"image_ratio={image_ratio} but there are only images: set it to 1")
    for kind, never in (("image", 0), ("video", 1)):  # given, yet never drawn
        if counts[kind] and image_ratio == never:
            raise ValueError(f"{counts[kind]} {kind}s but image_ratio={image_ratio}: they would never be drawn")
