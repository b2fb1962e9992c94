"""Latent caching: encode a manifest's clips with the VAE once, then train the base stage from
the latents instead of decoding and encoding every clip at every step.

    python -m dit_video.data.latent_cache --manifest data/synthetic/train/manifest.jsonl \
        --vae checkpoints/vae_tiny --shape 9x32x32 --shape 17x32x48 --out data/latents --windows 4

writes one folder per bucket shape, `<out>/<frames>x<height>x<width>/`: shards
`shard_00000.safetensors`, ... (one float32 tensor [C, t, h, w] per item, named by its number)
and `index.json` (the VAE it was made with: directory, config, latent statistics and a hash of
its weights; the manifest and its hash; the pixel and latent shapes; per item the manifest
index, window, caption, path, shard and key; and the files skipped, with their errors).

For a super-resolution stage (`--cascade-spatial`, `--cascade-temporal`), each item also holds
`<key>.low`: the latent of the same clip made small as that stage's training makes it
(`downsample_video`, then encoded), so a TSR or SSR run trains from the cache too, with its
condition upsampled and augmented per step exactly as from pixels.

An item is one of `windows` clip windows of an entry, read by MediaDataset with item seeds
0 .. windows - 1; `LatentDataset` picks window `item_seed % windows`, so the sampler's keys map
to cached latents the way they map to pixels, with `windows` start frames per clip instead of
all of them. Latents stay float32 (not float16): with a 4x8x8, 4-channel VAE they are still
~40x smaller than the uint8 frames they replace, and training from the cache sees the numbers
that encoding on the fly would give (up to float rounding between batch sizes, ~1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from vae import VAEConfig, VideoVAE

from ..cli import UsageError, exits_cleanly, parse_device
from ..config import from_dict, read_yaml, to_dict
from ..files import atomic_dir, sha256_file
from ..diffusion.cascade import downsample_video
from .dataset import Entry, MediaDataset, Shape, read_manifest
from .video import VideoError

__all__ = ["cache_latents", "LatentDataset", "parse_shape", "check_shape", "vae_identity"]


def shape_name(shape: Shape) -> str:
    return f"{shape.frames}x{shape.height}x{shape.width}"


def parse_shape(text: str) -> Shape:
    """`17x256x256` -> Shape(17, 256, 256); ValueError for anything else."""
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
    if not match or min(int(n) for n in match.groups()) < 1:
        raise ValueError(f"shape {text!r}: expected FRAMESxHEIGHTxWIDTH of positive ints, e.g. 17x256x256")
    return Shape(*(int(n) for n in match.groups()))


def check_shape(shape: Shape, vae: VideoVAE) -> None:
    """ValueError unless the VAE can encode clips of this pixel shape (the frame contract 1 + f*k,
    sizes divisible by the spatial factor)."""
    f, s = vae.temporal_factor, vae.spatial_factor
    if (shape.frames - 1) % f:
        raise ValueError(f"shape {shape_name(shape)}: the VAE (temporal factor {f}) takes 1 + {f}*k frames, "
                         f"e.g. {1 + f}, {1 + 2 * f}, {1 + 4 * f}")
    if shape.height % s or shape.width % s:
        raise ValueError(f"shape {shape_name(shape)}: height and width must be multiples of the VAE's "
                         f"spatial factor {s}")


def low_shape(shape: Shape, cascade: tuple[int, int]) -> Shape:
    """The pixel shape of a clip downsampled by (spatial, temporal) factors, as downsample_video
    makes it; ValueError if the factors do not divide it."""
    spatial, temporal = cascade
    if (shape.frames - 1) % temporal or shape.height % spatial or shape.width % spatial:
        raise ValueError(f"shape {shape_name(shape)}: the cascade factors (spatial {spatial}, temporal {temporal}) "
                         f"must divide the height, the width and the frames less one")
    return Shape(1 + (shape.frames - 1) // temporal, shape.height // spatial, shape.width // spatial)


def vae_identity(vae_dir: str | os.PathLike) -> dict:
    """What tells two VAE directories apart: the config, the latent statistics (which `encode`
    normalizes with) and the SHA-256 of the weights file, which also catches same-config VAEs
    with other weights. Reads the statistics without building the model."""
    vae_dir = Path(vae_dir)
    config = from_dict(VAEConfig, read_yaml(vae_dir / "config.yaml"), source=str(vae_dir / "config.yaml"))
    weights = vae_dir / "model.safetensors"
    with safe_open(weights, "pt") as f:
        shift, scale = f.get_tensor("latent_shift").tolist(), f.get_tensor("latent_scale").tolist()
    return {"config": to_dict(config), "latent_shift": shift, "latent_scale": scale, "weights_sha256": sha256_file(weights)}


# ---------------------------------------------------------------------------------------------
# Writing


def cache_latents(manifest: str | os.PathLike, vae_dir: str | os.PathLike, shapes: list[Shape],
                  out_dir: str | os.PathLike, *, fps: float | None = None, stride: int = 1, windows: int = 1,
                  shard_size: int = 256, device: str | torch.device = "cpu", batch_size: int = 4,
                  cascade: tuple[int, int] = (1, 1), progress: bool = True) -> Path:
    """Encode `windows` clip windows of every manifest entry at every pixel shape into
    `<out_dir>/<frames>x<height>x<width>/`; returns `out_dir`.

    fps, stride: how clips are read, as in MediaDataset (use the training run's values).
    cascade: (spatial, temporal) factors of a super-resolution stage; other than (1, 1), each item
    also holds the latent of its clip downsampled by them (`<key>.low`).
    Files that cannot be read at a shape (VideoError) are skipped, printed once each on stderr
    and listed in that shape's index.json. Each shape folder is written under a temporary name
    and renamed when complete, replacing an older one. Bad input (manifest, VAE directory, a
    shape the VAE cannot take, options) raises ValueError before anything is read or written.
    """
    if windows < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(f"need windows, shard_size and batch_size >= 1, got {windows}, {shard_size}, {batch_size}")
    if min(cascade) < 1:
        raise ValueError(f"cascade factors must be >= 1, got {cascade}")
    entries = read_manifest(manifest)
    dataset = MediaDataset(entries, "video", fps=fps, stride=stride)
    vae = VideoVAE.from_pretrained(vae_dir).to(device).eval()
    shapes = list(dict.fromkeys(shapes))
    for shape in shapes:
        check_shape(shape, vae)
        if cascade != (1, 1):
            low = low_shape(shape, cascade)
            try:
                check_shape(low, vae)
            except ValueError as e:
                raise ValueError(f"the cascade factors make {shape_name(shape)} into {e}") from None
    common = {"vae": {"dir": str(vae_dir), **vae_identity(vae_dir)}, "manifest": str(manifest),
              "manifest_sha256": sha256_file(Path(manifest)), "fps": fps, "stride": stride, "windows": windows,
              "dtype": "float32", "cascade": None if cascade == (1, 1) else {"spatial": cascade[0], "temporal": cascade[1]}}
    reported: set[str] = set()  # files already printed as skipped, at any shape
    for shape in shapes:
        with atomic_dir(Path(out_dir) / shape_name(shape)) as folder:
            _cache_shape(dataset, vae, shape, folder, common, shard_size, batch_size, reported, progress)
    return Path(out_dir)


@torch.no_grad()
def _cache_shape(dataset: MediaDataset, vae: VideoVAE, shape: Shape, folder: Path, common: dict,
                 shard_size: int, batch_size: int, reported: set[str], progress: bool) -> None:
    """One shape's shards and index.json, written into `folder`."""
    device, windows = vae.latent_shift.device, common["windows"]
    items, skipped, shard, pending = [], {}, {}, []  # pending: (item, clip) waiting for a full batch

    cascade = common["cascade"]

    def encode(batch: list[tuple[dict, torch.Tensor]]) -> None:
        clips = torch.stack([clip for _, clip in batch]).to(device)
        latents = vae.encode(clips).float().cpu()
        low = None if cascade is None else \
            vae.encode(downsample_video(clips, cascade["spatial"], cascade["temporal"])).float().cpu()
        for i, ((item, _), latent) in enumerate(zip(batch, latents)):
            shard[item["key"]] = latent.clone()  # a view would share the batch's storage, which safetensors refuses
            if low is not None:
                shard[item["key"] + ".low"] = low[i].clone()
            if len(shard) == shard_size * (1 if low is None else 2):
                (folder / item["shard"]).write_bytes(save(shard))  # not save_file: it makes files private (0600)
                shard.clear()

    for index, entry in enumerate(tqdm(dataset.entries, desc=shape_name(shape), unit="clip", disable=not progress)):
        try:  # all windows or none, so that every cached entry has `windows` of them
            clips = [dataset[index, shape, window]["video"] for window in range(windows)]
        except VideoError as e:
            skipped[str(entry.path)] = str(e)
            if str(entry.path) not in reported:
                reported.add(str(entry.path))
                tqdm.write(f"skipped {e}", file=sys.stderr)
            continue
        for window, clip in enumerate(clips):
            number = len(items)
            items.append({"index": index, "window": window, "caption": entry.caption, "path": str(entry.path),
                          "shard": f"shard_{number // shard_size:05d}.safetensors", "key": str(number)})
            pending.append((items[-1], clip))
        while len(pending) >= batch_size:
            encode(pending[:batch_size])
            pending = pending[batch_size:]
    if pending:
        encode(pending)
    if shard:  # the last, partly filled shard
        (folder / items[-1]["shard"]).write_bytes(save(shard))

    latent_shape = vae.latent_shape((1, 3, shape.frames, shape.height, shape.width))[1:]
    index = {**common, "shape": [shape.frames, shape.height, shape.width], "latent_shape": list(latent_shape),
             "items": items, "skipped": skipped}
    if cascade is not None:
        low = low_shape(shape, (cascade["spatial"], cascade["temporal"]))
        index["cascade"] = {**cascade, "latent_shape": list(vae.latent_shape((1, 3, low.frames, low.height,
                                                                               low.width))[1:])}
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    if progress:
        tqdm.write(f"{shape_name(shape)}: {len(items) // windows} clips x {windows} windows, "
                   f"{len(skipped)} skipped", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Reading


class LatentDataset(torch.utils.data.Dataset):
    """The latents of a cache folder (every `<frames>x<height>x<width>/` in it), indexed like
    MediaDataset by `(index, shape, item_seed)`: item `{"latent": [C, t, h, w] float32,
    "caption": str, "index": int}`, the window `item_seed % windows`; from a cache made for a
    super-resolution stage also `"low"`, the latent of the clip downsampled by `cascade[shape]`.

    Its entries are the manifest's entries that have latents at one shape at least, in manifest
    order. An entry that was skipped at the requested shape (say, too short for it) raises
    VideoError, so the Loader substitutes it as it would a bad file. Shards are opened on first
    use in each process and kept open (memory maps, no file descriptors).
    """

    kind = "video"

    def __init__(self, cache_dir: str | os.PathLike):
        self.root = Path(cache_dir)
        folders = sorted(p.parent for p in self.root.glob("*/index.json") if not p.parent.name.startswith("."))
        if not folders:
            raise ValueError(f"{self.root}: not a latent cache (no <frames>x<height>x<width>/index.json in it); "
                             f"write one with python -m dit_video.data.latent_cache")
        indexes = [json.loads((folder / "index.json").read_text()) for folder in folders]
        first = indexes[0]
        for folder, index in zip(folders[1:], indexes[1:]):
            if index["manifest_sha256"] != first["manifest_sha256"] or _differences(index["vae"], first["vae"]):
                raise ValueError(f"{folder} and {folders[0]} were made from different manifests or VAEs: "
                                 f"cache all shapes from the same ones")
        self.made_with = first["vae"]  # the VAE's directory, config, latent statistics and weights hash

        entries = {item["index"]: Entry(Path(item["path"]), item["caption"])
                   for index in indexes for item in index["items"]}
        order = sorted(entries)  # manifest indices -> dataset indices 0, 1, ...
        position = {m: i for i, m in enumerate(order)}
        self.entries = [entries[m] for m in order]
        if not self.entries:
            raise ValueError(f"{self.root}: the cache holds no latents (every file was skipped)")
        self.shapes = [Shape(*index["shape"]) for index in indexes]
        self._windows = {shape: index["windows"] for shape, index in zip(self.shapes, indexes)}
        self._skipped = {shape: index["skipped"] for shape, index in zip(self.shapes, indexes)}
        # per shape: (spatial, temporal) of its low-resolution latents, None without them
        self.cascade = {shape: (index["cascade"]["spatial"], index["cascade"]["temporal"])
                        if index.get("cascade") else None for shape, index in zip(self.shapes, indexes)}
        self._where = {(shape, position[item["index"]], item["window"]): (folder / item["shard"], item["key"])
                       for shape, folder, index in zip(self.shapes, folders, indexes) for item in index["items"]}
        self._shards: dict[Path, object] = {}  # shard path -> open safe_open handle, per process

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, Shape, int]) -> dict:
        index, shape, item_seed = key
        if shape not in self._windows:
            raise ValueError(f"no latents at {shape_name(shape)} in {self.root}; it holds "
                             f"{', '.join(shape_name(s) for s in self.shapes)}")
        where = self._where.get((shape, index, item_seed % self._windows[shape]))
        if where is None:
            error = self._skipped[shape][str(self.entries[index].path)]
            raise VideoError(f"{error} (no latents at {shape_name(shape)} in {self.root})")
        shard, name = where
        if shard not in self._shards:
            self._shards[shard] = safe_open(shard, "pt")
        item = {"latent": self._shards[shard].get_tensor(name), "caption": self.entries[index].caption,
                "index": index}
        if self.cascade[shape] is not None:
            item["low"] = self._shards[shard].get_tensor(name + ".low")
        return item

    def __getstate__(self) -> dict:
        """Open shards stay behind: a copy in another process opens its own."""
        return {**self.__dict__, "_shards": {}}

    def check_vae(self, vae_dir: str | os.PathLike) -> None:
        """ValueError, in one line, unless `vae_dir` holds the VAE that the latents were made with."""
        differences = _differences(vae_identity(vae_dir), self.made_with)
        if differences:
            raise ValueError(f"{self.root}: latents made with the VAE in {self.made_with['dir']}, not the one in "
                             f"{vae_dir} (other {', '.join(differences)}); cache them again with this VAE")


def _differences(a: dict, b: dict) -> list[str]:
    """The parts of two VAE identities that differ (the directory may move)."""
    names = {"config": "config", "latent_shift": "latent statistics", "latent_scale": "latent statistics",
             "weights_sha256": "weights"}
    return list(dict.fromkeys(name for key, name in names.items() if a[key] != b[key]))


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_video.data.latent_cache",
                                     description="Encode a manifest's clips with a VAE into a latent cache.")
    parser.add_argument("--manifest", required=True, help="a JSONL manifest of videos")
    parser.add_argument("--vae", required=True, help="a VAE directory (config.yaml + model.safetensors)")
    parser.add_argument("--shape", required=True, action="append", metavar="FxHxW",
                        help="a bucket's pixel shape, e.g. 17x256x256; repeat for several")
    parser.add_argument("--out", required=True, help="the cache folder (one subfolder per shape)")
    parser.add_argument("--windows", type=int, default=1, help="clip windows per file (default: %(default)s)")
    parser.add_argument("--fps", type=float, help="sample clips at this rate, as data.fps (default: use --stride)")
    parser.add_argument("--stride", type=int, default=1, help="frame stride, as data.stride (default: %(default)s)")
    parser.add_argument("--cascade-spatial", type=int, default=1, metavar="N",
                        help="also cache each clip made N times smaller, for an SSR stage (default: %(default)s)")
    parser.add_argument("--cascade-temporal", type=int, default=1, metavar="N",
                        help="also cache each clip at every N-th frame, for a TSR stage (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="clips per VAE call (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ... (default: %(default)s)")
    return parser


@exits_cleanly
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        shapes = [parse_shape(text) for text in args.shape]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if min(args.windows, args.stride, args.batch_size, args.cascade_spatial, args.cascade_temporal) < 1 \
            or (args.fps is not None and not args.fps > 0):
        raise UsageError("need --windows, --stride, --batch-size and the cascade factors >= 1, and --fps > 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    device = parse_device(args.device)
    try:
        cache_latents(args.manifest, args.vae, shapes, out, fps=args.fps, stride=args.stride, windows=args.windows,
                      device=device, batch_size=args.batch_size, cascade=(args.cascade_spatial, args.cascade_temporal))
    except ValueError as e:  # the manifest, the VAE or a shape: checked before anything is read or written
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"{out}: cannot write ({e.strerror})") from None
    print(f"wrote {', '.join(shape_name(s) for s in dict.fromkeys(shapes))} latents to {out}")


if __name__ == "__main__":
    main()
