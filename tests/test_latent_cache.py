"""Latent caching: the cache holds vae.encode of the windows MediaDataset reads, bad files are
skipped and named, and the Loader over a LatentDataset gives the latents of the video Loader's
batches, with workers and across a resume."""

import contextlib
import io
import itertools
import json
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dit_video.data import BucketConfig, BucketSampler, Loader, MediaDataset, Shape, VideoError, read_manifest
from dit_video.data.latent_cache import LatentDataset, cache_latents, main, vae_identity
from dit_video.data.synthetic import generate
from vae import VideoVAE

WINDOWS = 2
SHAPES = [Shape(9, 32, 32), Shape(5, 32, 64)]  # the tiny VAE is 4x8x8: 1 + 4k frames, multiples of 8
BUCKETS = [BucketConfig(9, 32, 32, 3), BucketConfig(5, 32, 64, 2)]
TOLERANCE = 1e-5  # the CPU convolutions differ by ~3e-6 between batch sizes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 clips of 13 frames (so the two windows of a shape start at different frames), a 7-frame
    clip that only the 5-frame shape can take, a corrupt file, a tiny random VAE, and their cache."""
    root = tmp_path_factory.mktemp("data")
    manifest = generate(root, "train", count=6, frames=13, size=32, progress=False)
    folder = manifest.parent
    short = generate(root / "short", "val", count=1, frames=7, size=32, progress=False)
    (short.parent / "00000.mp4").rename(folder / "short.mp4")
    (folder / "broken.mp4").write_text("not a video\n")
    lines = manifest.read_text().splitlines()
    lines.insert(2, json.dumps({"path": "broken.mp4", "caption": "broken"}))
    lines.insert(4, json.dumps({"path": "short.mp4", "caption": "short"}))
    manifest.write_text("\n".join(lines) + "\n")

    torch.manual_seed(0)
    vae = VideoVAE.from_config("configs/vae/tiny.yaml").eval()
    vae.save_pretrained(root / "vae")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        cache = cache_latents(manifest, root / "vae", SHAPES, root / "cache", windows=WINDOWS, shard_size=5,
                              progress=False)
    return {"root": root, "manifest": manifest, "vae": vae, "cache": cache, "stderr": stderr.getvalue()}


def index_json(data, shape):
    return json.loads((data["cache"] / f"{shape.frames}x{shape.height}x{shape.width}" / "index.json").read_text())


def test_cache_holds_the_encoded_windows(data):
    entries = read_manifest(data["manifest"])
    videos = MediaDataset(entries, "video")
    for shape in SHAPES:
        index = index_json(data, shape)
        folder = data["cache"] / f"{shape.frames}x{shape.height}x{shape.width}"
        assert index["shape"] == [shape.frames, shape.height, shape.width]
        assert index["latent_shape"] == list(data["vae"].latent_shape((1, 3, *index["shape"]))[1:])
        assert index["windows"] == WINDOWS and index["dtype"] == "float32"
        assert index["vae"]["dir"] == str(data["root"] / "vae")
        assert index["vae"]["config"]["latent_channels"] == 4 and index["vae"]["latent_scale"] == [1.0] * 4
        shards = [f"shard_{i:05d}.safetensors" for i in range(-(-len(index["items"]) // 5))]  # 5 items a shard
        assert sorted(p.name for p in folder.iterdir()) == ["index.json", *shards]
        starts = set()
        for item in index["items"]:
            entry = entries[item["index"]]
            assert item["caption"] == entry.caption and item["path"] == str(entry.path)
            clip = videos[item["index"], shape, item["window"]]["video"]
            starts.add((item["index"], clip[:, 0].sum().item()))
            with torch.no_grad():
                expected = data["vae"].encode(clip[None])[0]
            latent = load_file(folder / item["shard"])[item["key"]]
            assert latent.dtype == torch.float32
            torch.testing.assert_close(latent, expected, rtol=0, atol=TOLERANCE)
        assert len(starts) == len(index["items"])  # the two windows of a clip differ


def test_bad_files_are_skipped_and_named_once(data):
    folder = data["manifest"].parent
    nine, five = (index_json(data, shape) for shape in SHAPES)
    assert nine["skipped"].keys() == {str(folder / "broken.mp4"), str(folder / "short.mp4")}
    assert five["skipped"].keys() == {str(folder / "broken.mp4")}
    assert "too few" in nine["skipped"][str(folder / "short.mp4")]
    assert {item["index"] for item in nine["items"]} == {0, 1, 3, 5, 6, 7}
    assert {item["index"] for item in five["items"]} == {0, 1, 3, 4, 5, 6, 7}
    lines = data["stderr"].splitlines()
    assert sorted(lines) == sorted(f"skipped {nine['skipped'][path]}" for path in nine["skipped"])


def test_latent_dataset_items(data):
    dataset = LatentDataset(data["cache"])
    assert dataset.kind == "video" and len(dataset) == 7 and set(dataset.shapes) == set(SHAPES)
    assert dataset.entries[3].caption == "short"  # manifest line 5: line 3 (broken) has no latents
    for seed in range(4):
        item = dataset[0, SHAPES[1], seed]
        assert item["latent"].shape == (4, 2, 4, 8) and item["latent"].dtype == torch.float32
        assert item["index"] == 0 and item["caption"] == dataset.entries[0].caption
        assert torch.equal(item["latent"], dataset[0, SHAPES[1], seed % WINDOWS]["latent"])
    assert not torch.equal(dataset[0, SHAPES[1], 0]["latent"], dataset[0, SHAPES[1], 1]["latent"])
    with pytest.raises(VideoError, match=r"short\.mp4: has 7 frames.*\(no latents at 9x32x32 in "):
        dataset[3, SHAPES[0], 0]
    with pytest.raises(ValueError, match="^no latents at 17x32x32 in .*; it holds 5x32x64, 9x32x32$"):
        dataset[0, Shape(17, 32, 32), 0]
    copy = pickle.loads(pickle.dumps(dataset))  # as sent to spawned workers, after shards were opened here
    assert torch.equal(copy[4, SHAPES[0], 1]["latent"], dataset[4, SHAPES[0], 1]["latent"])


def test_a_cache_for_super_resolution_holds_the_low_resolution_latents(data, tmp_path):
    """Each item's `low` is the VAE's encoding of its clip made small as that stage's training
    makes it (downsample_video), and the Loader batches it beside the latents."""
    from dit_video.diffusion import downsample_video

    shape, cascade = Shape(9, 32, 64), (1, 2)  # a TSR's: every other frame (the 8x VAE takes no smaller frames)
    cache = cache_latents(data["manifest"], data["root"] / "vae", [shape], tmp_path / "cache", windows=WINDOWS,
                          cascade=cascade, progress=False)
    dataset = LatentDataset(cache)
    assert dataset.cascade == {shape: cascade}
    videos = MediaDataset(read_manifest(data["manifest"]), "video")
    index = json.loads((cache / f"{shape.frames}x{shape.height}x{shape.width}" / "index.json").read_text())
    for item in index["items"][:4]:
        clip = videos[item["index"], shape, item["window"]]["video"]
        with torch.no_grad():
            low = data["vae"].encode(downsample_video(clip[None], *cascade))[0]
        got = dataset[dataset.entries.index(next(e for e in dataset.entries if str(e.path) == item["path"])),
                      shape, item["window"]]
        assert got["low"].shape == tuple(index["cascade"]["latent_shape"]) == low.shape
        torch.testing.assert_close(got["low"], low, rtol=0, atol=TOLERANCE)
    loader = Loader(dataset, None, BucketSampler(len(dataset), 0, [BucketConfig(shape.frames, shape.height, shape.width, 2)], [], 0,
                                           seed=1))
    batch = next(iter(loader))
    assert batch["low_latents"].shape == (2, *index["cascade"]["latent_shape"])
    assert "low_latents" not in next(iter(loaders(data)[0]))  # a base stage's cache has none


class Windows(MediaDataset):
    """The video dataset as the cache sees it: an item's seed picks one of WINDOWS windows."""

    def __getitem__(self, key):
        index, shape, seed = key
        return super().__getitem__((index, shape, seed % WINDOWS))


def loaders(data, num_workers=0):
    """A loader over the cache and one over the clips it was made from, with the same keys."""
    latents = LatentDataset(data["cache"])
    cached = {entry.path for entry in latents.entries}
    videos = Windows([entry for entry in read_manifest(data["manifest"]) if entry.path in cached], "video")
    return [Loader(dataset, None, BucketSampler(len(dataset), 0, BUCKETS, [], 0, seed=1), num_workers=num_workers)
            for dataset in (latents, videos)]


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_gives_the_latents_of_the_video_batches(data, num_workers):
    cached, decoded = loaders(data, num_workers)
    for a, b in zip(take(cached, 6), take(decoded, 6), strict=True):
        assert "video" not in a and a["captions"] == b["captions"] and a["shape"] == b["shape"]
        assert torch.equal(a["is_image"], b["is_image"])
        with torch.no_grad():
            torch.testing.assert_close(a["latents"], data["vae"].encode(b["video"]), rtol=0, atol=TOLERANCE)
    assert {Shape(*batch["latents"].shape[2:]) for batch in take(cached, 6)} == {Shape(3, 4, 4), Shape(2, 4, 8)}
    assert cached.skipped.keys() == decoded.skipped.keys() == {str(data["manifest"].parent / "short.mp4")}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_identical_latents(data, num_workers):
    reference = take(loaders(data, num_workers)[0], 8)
    first = loaders(data, num_workers)[0]
    take(first, 3)
    resumed = loaders(data, num_workers)[0]
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(reference[3:], take(resumed, 5), strict=True):
        assert torch.equal(a["latents"], b["latents"]) and a["captions"] == b["captions"]


def test_loader_needs_every_bucket_cached(data):
    latents = LatentDataset(data["cache"])
    sampler = BucketSampler(len(latents), 0, [*BUCKETS, BucketConfig(17, 32, 32, 1)], [], 0, seed=0)
    with pytest.raises(ValueError, match="^video buckets 17x32x32 are not in the latent cache, which holds "):
        Loader(latents, None, sampler)


def test_another_vae_is_detected(data, tmp_path):
    dataset = LatentDataset(data["cache"])
    dataset.check_vae(data["root"] / "vae")
    torch.manual_seed(1)  # the cache's VAE was drawn with seed 0
    VideoVAE.from_config("configs/vae/tiny.yaml").save_pretrained(tmp_path / "weights")
    with pytest.raises(ValueError, match=r"latents made with the VAE in .*vae, not the one in .*weights \(other "
                                         r"weights\); cache them again"):
        dataset.check_vae(tmp_path / "weights")
    other = VideoVAE.from_config({**vae_identity(data["root"] / "vae")["config"], "latent_channels": 8})
    other.latent_shift.fill_(0.5)
    other.save_pretrained(tmp_path / "config")
    with pytest.raises(ValueError, match=r"\(other config, latent statistics, weights\)"):
        dataset.check_vae(tmp_path / "config")


def test_a_failure_midway_writes_nothing(data, tmp_path, monkeypatch):
    calls = []

    def failing(self, video, **kwargs):
        calls.append(1)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(VideoVAE, "encode", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        cache_latents(data["manifest"], data["root"] / "vae", SHAPES[:1], tmp_path / "cache", progress=False)
    assert calls and list((tmp_path / "cache").iterdir()) == []


def run(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("change, error", [
    ({"--shape": "9x32"}, "error: shape '9x32': expected FRAMESxHEIGHTxWIDTH"),
    ({"--shape": "8x32x32"}, "error: shape 8x32x32: the VAE (temporal factor 4) takes 1 + 4*k frames"),
    ({"--shape": "9x32x36"}, "error: shape 9x32x36: height and width must be multiples of the VAE's spatial factor 8"),
    ({"--manifest": "missing.jsonl"}, "error: missing.jsonl: no such manifest"),
    ({"--vae": "missing"}, "error: missing: not a model directory"),
    ({"--windows": "0"}, "error: need --windows, --stride, --batch-size and the cascade factors >= 1"),
    ({"--cascade-temporal": "3"}, "error: shape 9x32x32: the cascade factors (spatial 1, temporal 3) must divide"),
    ({"--cascade-spatial": "8"}, "error: the cascade factors make 9x32x32 into shape 9x4x4: height and width"),
    ({"--device": "gpu"}, "error: --device gpu: not a torch device"),
])
def test_cli_errors_exit_2_and_write_nothing(data, tmp_path, capsys, change, error):
    args = {"--manifest": str(data["manifest"]), "--vae": str(data["root"] / "vae"), "--shape": "9x32x32",
            "--out": str(tmp_path / "out"), **change}
    code, err = run([x for pair in args.items() for x in pair], capsys)
    assert code == 2 and err.startswith(error) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_cache(data, tmp_path):
    """As a module, so that nothing but the error reaches stderr (no warning from runpy either)."""
    command = [sys.executable, "-m", "dit_video.data.latent_cache", "--manifest", str(data["manifest"]),
               "--vae", str(data["root"] / "vae"), "--out", str(tmp_path / "out")]
    bad = subprocess.run(command + ["--shape", "6x32x32"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: shape 6x32x32")
    good = subprocess.run(command + ["--shape", "1x32x32"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert good.stdout.strip() == f"wrote 1x32x32 latents to {tmp_path / 'out'}"
    dataset = LatentDataset(tmp_path / "out")
    assert dataset.shapes == [Shape(1, 32, 32)] and len(dataset) == 7  # one frame: the short clip fits too
    assert dataset[0, Shape(1, 32, 32), 5]["latent"].shape == (4, 1, 4, 4)
