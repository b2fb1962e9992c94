"""Batches of decoded pixels for training: the bucket sampler's keys, decoded in DataLoader workers.
With a LatentDataset (see latent_cache.py) in place of the video dataset, video batches carry
cached VAE latents instead of pixels; everything else is the same.

The sampler runs in the main process and hands whole batches of keys to the workers, so the
stream does not depend on the number of workers, and the loader's state is the sampler's state
after the last batch given to the caller (not after the batches the workers have prefetched).

A file that cannot be used is replaced by the next usable file of the same dataset (index + 1,
index + 2, ..., wrapping around) at the same shape and seed, so a batch keeps its size and the
stream stays reproducible. A worker decodes a bad file once per shape and passes over it after; it
sends the bad path and its error back with the batch, and the main process records it in
`skipped` (path -> the one-line error, which names the file) for the caller to report. Only a
dataset without one usable file raises (NoUsableData), so bad files never stop training.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Iterator

import torch
from torch.utils.data import DataLoader

from .buckets import Batch, BucketSampler
from .dataset import MediaDataset, Shape
from .video import VideoError

if TYPE_CHECKING:  # not imported at run time, so that `python -m dit_video.data.latent_cache` runs it cleanly
    from .latent_cache import LatentDataset

__all__ = ["Loader", "NoUsableData"]


class NoUsableData(RuntimeError):
    """No file of a dataset can be read at a bucket's shape: the data, not the code, is at fault."""


class Loader:
    """An infinite iterator of batches `{"video": [B, 3, T, H, W], "captions": [B] str,
    "is_image": [B] bool, "shape": Shape}` with exact resume through `state_dict`.

    videos, images: the datasets, or None for a kind without data (as in the sampler). With a
        LatentDataset for the videos, video batches hold `"latents": [B, C, t, h, w]` in place
        of "video" (and, from a cache made for a super-resolution stage, `"low_latents"`), and
        every video bucket must be one of its cached shapes.
    num_workers: DataLoader processes that decode (0: this process); the stream is the same for any.
    """

    def __init__(self, videos: MediaDataset | LatentDataset | None, images: MediaDataset | None,
                 sampler: BucketSampler, num_workers: int = 0):
        for kind, dataset in (("video", videos), ("image", images)):
            if dataset is not None and dataset.kind != kind:
                raise ValueError(f"the {kind} dataset holds {dataset.kind}s")
            if (len(dataset) if dataset is not None else 0) != sampler.counts[kind]:
                raise ValueError(f"the sampler expects {sampler.counts[kind]} {kind}s, the dataset has "
                                 f"{len(dataset) if dataset is not None else 'none'}")
        cached = getattr(videos, "shapes", None)  # a LatentDataset holds its shapes only
        if cached is not None:
            missing = [f"{b.frames}x{b.height}x{b.width}" for b in sampler.buckets["video"]
                       if Shape(b.frames, b.height, b.width) not in cached]
            if missing:
                raise ValueError(f"video buckets {', '.join(missing)} are not in the latent cache, which holds "
                                 f"{', '.join(f'{s.frames}x{s.height}x{s.width}' for s in cached)}")
        if num_workers < 0:
            raise ValueError(f"need num_workers >= 0, got {num_workers}")
        self.reader = _Reader(videos, images)
        self.sampler, self.num_workers = sampler, num_workers
        self.skipped: dict[str, str] = {}
        self._state: dict | None = None  # the sampler's state after the last batch yielded; None: none yet

    def __iter__(self) -> Iterator[dict]:
        """Batches from the last one yielded on (an earlier iteration's prefetched batches are redrawn)."""
        if self._state is not None:
            self.sampler.load_state_dict(self._state)
        drawn = collections.deque()  # the sampler's state after each batch sent to the workers

        def batches() -> Iterator[Batch]:
            for batch in self.sampler:
                drawn.append(self.sampler.state_dict())
                yield batch

        loader = DataLoader(self.reader, sampler=batches(), batch_size=None, collate_fn=_unchanged,
                            num_workers=self.num_workers)
        for out in loader:
            self._state = drawn.popleft()
            for path, error in out.pop("skipped").items():
                self.skipped.setdefault(path, error)
            if "error" in out:
                raise NoUsableData(out["error"])
            yield out

    def state_dict(self) -> dict:
        """Valid for any rank and world size, like the sampler's (see BucketSampler.state_dict)."""
        return {"sampler": self._state if self._state is not None else self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last batch yielded before `state` was taken; nothing is decoded."""
        self.sampler.load_state_dict(state["sampler"])
        self._state = None


def _unchanged(batch: dict) -> dict:
    """The reader returns whole batches: nothing is left to collate."""
    return batch


class _Reader(torch.utils.data.Dataset):
    """The worker side: one `Batch` of keys in, one batch of pixels or latents (and the files skipped) out."""

    def __init__(self, videos: MediaDataset | LatentDataset | None, images: MediaDataset | None):
        self.datasets = {"video": videos, "image": images}
        self.bad: dict[tuple[str, int, Shape], str] = {}  # this worker's failures, not decoded again

    def __getitem__(self, batch: Batch) -> dict:
        skipped: dict[str, str] = {}
        items = []
        for index, shape, seed in batch.keys:
            item = self._read(batch.kind, index, shape, seed, skipped)
            if isinstance(item, str):  # an error travels as data, so it reaches the caller as one line
                return {"skipped": skipped, "error": item}
            items.append(item)
        if "latent" in items[0]:  # from a LatentDataset: the VAE has already run
            data = {"latents": torch.stack([item["latent"] for item in items])}
            if "low" in items[0]:  # and a super-resolution stage's low-resolution clip
                data["low_latents"] = torch.stack([item["low"] for item in items])
        else:
            data = {"video": torch.stack([item["video"] for item in items])}
        return {**data, "captions": [item["caption"] for item in items],
                "is_image": torch.full((len(items),), batch.kind == "image"),
                "shape": batch.shape, "skipped": skipped}

    def _read(self, kind: str, index: int, shape: Shape, seed: int, skipped: dict[str, str]) -> dict | str:
        """The item at `index`, or the first usable one after it; a message if there is none."""
        dataset = self.datasets[kind]
        for offset in range(len(dataset)):
            substitute = (index + offset) % len(dataset)
            if (kind, substitute, shape) in self.bad:
                continue
            try:
                return dataset[substitute, shape, seed]
            except VideoError as e:
                self.bad[kind, substitute, shape] = skipped[str(dataset.entries[substitute].path)] = str(e)
        return (f"none of the {len(dataset)} {kind} files can be read at {shape.frames}x{shape.height}x{shape.width}, "
                f"e.g. {self.bad[kind, index, shape]}")
