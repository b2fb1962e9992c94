"""train.py for the diffusion stages, run for real: DeepSpeed on CPU with gloo, one or two
processes under torchrun, a tiny dit on a tiny VAE, synthetic clips plus a corrupt file.

Exactness is checked on the logged losses: a run stopped (SIGKILL) and resumed must log the very
same losses, step for step, as one that never stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from PIL import Image

from dit_video.data import read_manifest, read_video
from dit_video.data.synthetic import generate
from tiny_t5 import write_tiny_t5

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic clips (one of them truncated), an untrained tiny VAE (its latents normalized), and
    a base config."""
    folder = tmp_path_factory.mktemp("diffusion")
    generate(folder / "data", "train", count=8, frames=17, size=48)
    manifest = folder / "data/train/manifest.jsonl"
    good = (folder / "data/train/00000.mp4").read_bytes()
    (folder / "data/train/broken.mp4").write_bytes(good[: len(good) // 3])
    with open(manifest, "a") as f:
        f.write(json.dumps({"path": "broken.mp4", "caption": "a broken clip"}) + "\n")
    from vae import VideoVAE

    torch.manual_seed(0)
    vae = VideoVAE.from_config(ROOT / "configs/vae/tiny.yaml").eval()
    with torch.no_grad():  # unit-variance latents, as a trained VAE gives
        vae.fit_latent_stats(read_video(e.path, num_frames=9, size=(32, 32))[None] for e in read_manifest(manifest)[:6])
    vae.save_pretrained(folder / "vae")
    images = folder / "images"
    images.mkdir()
    lines = []
    for i, entry in enumerate(read_manifest(manifest)[:4]):  # first frames as images, for joint training
        frame = ((read_video(entry.path, num_frames=1)[:, 0] + 1) * 127.5).round().byte().permute(1, 2, 0)
        Image.fromarray(frame.numpy()).save(images / f"{i}.png")
        lines.append(json.dumps({"path": f"{i}.png", "caption": entry.caption}))
    (images / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    config = yaml.safe_load((ROOT / "configs/base/tiny.yaml").read_text())
    config.update(vae=str(folder / "vae"), backbone=str(ROOT / "configs/dit/dit_tiny.yaml"))
    config["data"].update(videos=str(manifest), buckets=[
        {"frames": 9, "height": 32, "width": 32, "batch_size": 2},
        {"frames": 17, "height": 32, "width": 48, "batch_size": 1}])
    config["optim"].update(warmup_steps=2, lr_schedule="cosine")
    config["train"].update(steps=8, checkpoint_every=3, log_every=1, tensorboard=False)
    (folder / "base.yaml").write_text(yaml.safe_dump(config))
    return folder


def command(setup: Path, out: Path, procs: int, *overrides: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] \
        if procs > 1 else [sys.executable]
    return [*launcher, str(ROOT / "train.py"), str(setup / "base.yaml"), f"out_dir={out}", *overrides]


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(setup: Path, out: Path, procs: int, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command(setup, out, procs, *overrides), env=env(), capture_output=True, text=True,
                            timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def kill_after_checkpoint(setup: Path, out: Path, procs: int, step: int, *overrides: str) -> None:
    """Start a run and SIGKILL all its processes as soon as the checkpoint of `step` is complete."""
    proc = subprocess.Popen(command(setup, out, procs, *overrides), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    marker = out / f"checkpoints/step_{step:08d}/COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.parametrize("zero, accumulate", [(2, 1), (3, 2)])
def test_two_processes_killed_and_resumed_log_the_same_losses(setup, tmp_path, zero, accumulate):
    whole = run(setup, tmp_path / "whole", 2, f"optim.zero={zero}", f"optim.grad_accum={accumulate}")
    reference = losses(tmp_path / "whole")
    assert sorted(reference) == list(range(1, 9)) and all(map(lambda v: v == v, reference.values()))
    assert "broken.mp4" in whole.stdout  # the truncated clip is reported, and the run went on
    assert (tmp_path / "whole/model/model.safetensors").is_file()

    out = tmp_path / "killed"
    kill_after_checkpoint(setup, out, 2, 3, f"optim.zero={zero}", f"optim.grad_accum={accumulate}")
    resumed = run(setup, out, 2, f"optim.zero={zero}", f"optim.grad_accum={accumulate}")
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert losses(out) == reference
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_00000006", "step_00000008"]  # the newest two
    for name in ("model.safetensors", "ema.safetensors"):
        for key, value in load_file(out / "model" / name).items():
            torch.testing.assert_close(value, load_file(tmp_path / "whole/model" / name)[key], rtol=0, atol=0)


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_in_use(setup, tmp_path):
    out = tmp_path / "run"
    run(setup, out, 2, "train.steps=6")
    reference = losses(out)
    checkpoints = out / "checkpoints"
    # as if killed while writing step 9 (a .tmp folder) and before step 12 was marked complete
    shutil.copytree(checkpoints / "step_00000006", checkpoints / "step_00000009.tmp")
    shutil.copytree(checkpoints / "step_00000006", checkpoints / "step_00000012")
    (checkpoints / "step_00000012/COMPLETE").unlink()
    state = checkpoints / "step_00000012/ds"
    for file in state.iterdir():
        file.write_bytes(file.read_bytes()[:100])
    result = run(setup, out, 2, "train.steps=8")
    assert "resumed from" in result.stderr + result.stdout and "step_00000006" in result.stderr + result.stdout
    assert set(losses(out)) == set(range(1, 9)) and all(losses(out)[s] == reference[s] for s in range(1, 7))


def test_resume_with_fewer_processes_goes_through_a_universal_checkpoint(setup, tmp_path):
    # ZeRO-1 and ZeRO-2 share DeepSpeed's partitioned optimizer and its conversion; ZeRO-1 is the
    # one no other test here trains with
    out = tmp_path / "run"
    run(setup, out, 2, "train.steps=3", "optim.zero=1")
    written = {name: load_file(out / f"model/{name}.safetensors") for name in ("model", "ema")}
    # resumed at train.steps=3, it trains nothing and exports again: what the conversion restored
    result = run(setup, out, 1, "train.steps=3", "optim.zero=1")
    assert "universal checkpoint" in result.stderr + result.stdout
    assert (out / "checkpoints/step_00000003/universal").is_dir()
    for name, tensors in written.items():
        restored = load_file(out / f"model/{name}.safetensors")
        assert restored.keys() == tensors.keys() and all(torch.equal(restored[k], v) for k, v in tensors.items())
    run(setup, out, 1, "train.steps=5", "optim.zero=1")
    assert sorted(losses(out)) == [1, 2, 3, 4, 5]
    assert all(v == v and abs(v) < 100 for v in losses(out).values())


def test_ema_under_zero3_equals_ema_without_zero(setup, tmp_path):
    for zero in (0, 3):
        run(setup, tmp_path / f"zero{zero}", 2, f"optim.zero={zero}", "train.steps=4", "train.ema_decay=0.5")
    ema0, ema3 = (load_file(tmp_path / f"zero{z}/model/ema.safetensors") for z in (0, 3))
    assert ema0.keys() == ema3.keys() and len(ema0) > 10
    for key in ema0:
        torch.testing.assert_close(ema3[key], ema0[key], rtol=1e-5, atol=1e-6)
    weights = load_file(tmp_path / "zero3/model/model.safetensors")
    assert any(not torch.equal(weights[f"backbone.{k}"] if f"backbone.{k}" in weights else weights[k], ema3[k])
               for k in ema3)  # the average is not the last weights


def test_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    # Adam's first step moves every weight by about lr: with 1e30 the next forward overflows
    result = run(setup, out, 1, "optim.lr=1e30", "optim.warmup_steps=0", "optim.lr_schedule=constant",
                 "train.checkpoint_every=1", "train.max_nonfinite=3", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "3 non-finite losses in a row at step 2" in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]
    assert (out / "checkpoints/step_00000001/COMPLETE").is_file()


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(setup, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(command(setup, out, 1, "train.steps=40", "train.checkpoint_every=2",
                                    "train.gradient_checkpointing=true"), env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints/step_00000002/COMPLETE").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    last = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert f"SIGTERM: checkpoint of step {last} written" in output and last < 40
    assert max(losses(out)) == last


@pytest.mark.parametrize("stage, cascade", [("tsr", {"temporal": 2}), ("ssr", {"spatial": 2})])
def test_super_resolution_stages_train_on_augmented_low_resolution_latents(setup, tmp_path, stage, cascade):
    out = tmp_path / stage
    run(setup, out, 1, f"stage={stage}", f"cascade={json.dumps(cascade)}", "train.steps=3",
        "data.buckets=[{frames: 17, height: 32, width: 32, batch_size: 2}]")
    assert sorted(losses(out)) == [1, 2, 3]
    weights = load_file(out / "model/model.safetensors")
    assert weights["backbone.patch_embed.weight"].shape[1] == 8  # latent and condition, 4 channels each


def test_a_frozen_t5_feeds_the_backbone(setup, tmp_path):
    pytest.importorskip("transformers")
    captions = [entry.caption for entry in read_manifest(setup / "data/train/manifest.jsonl")]
    t5 = write_tiny_t5(tmp_path / "t5", captions)
    out = tmp_path / "run"
    run(setup, out, 1, "text={encoder: t5, path: " + str(t5) + ", caption_dropout: 0.2}", "train.steps=3",
        "backbone={name: dit, size: tiny}")
    assert sorted(losses(out)) == [1, 2, 3]
    weights = load_file(out / "model/model.safetensors")
    assert not any(k.startswith("text_encoder.") for k in weights)  # the frozen T5 is not part of the model
    assert weights["backbone.conditioning.text_proj.weight"].shape[1] == 32  # T5's d_model


def test_the_word_encoder_trains_with_the_model_and_is_stored_in_its_folder(setup, tmp_path):
    from dit_video.models.pretrained import DiffusionModel

    out = tmp_path / "run"
    run(setup, out, 1, "text={encoder: words, dim: 16, depth: 0, max_length: 16}", "train.steps=3",
        "backbone={name: dit, size: tiny, text_pool: linear}")
    assert sorted(losses(out)) == [1, 2, 3]
    weights = load_file(out / "model/model.safetensors")
    assert weights["text_encoder.embed.weight"].shape == (8193, 16)  # trained with the backbone, so stored
    assert "backbone.conditioning.text_pool.weight" in weights  # one linear map, not an MLP's fc1 and fc2
    assert weights["backbone.conditioning.text_proj.weight"].shape[1] == 16
    model = DiffusionModel.from_pretrained(out / "model", weights="model")
    torch.testing.assert_close(model.text_encoder.embed.weight, weights["text_encoder.embed.weight"])


def test_training_from_a_latent_cache_matches_training_from_videos(setup, tmp_path):
    from dit_video.data import Shape
    from dit_video.data.latent_cache import cache_latents

    bucket = "data.buckets=[{frames: 17, height: 32, width: 32, batch_size: 2}]"  # one window per clip
    manifest = setup / "data/train/manifest.jsonl"
    clean = manifest.with_name("clean.jsonl")  # a skipped file would shift the data order between the two
    clean.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if "broken" not in line))
    cache_latents(clean, setup / "vae", [Shape(17, 32, 32)], tmp_path / "cache", progress=False)
    run(setup, tmp_path / "videos", 1, bucket, "train.steps=4", f"data.videos={clean}")
    run(setup, tmp_path / "cached", 1, bucket, "train.steps=4", "data.videos=null",
        f"data.latents={tmp_path / 'cache'}")
    from_videos, from_cache = losses(tmp_path / "videos"), losses(tmp_path / "cached")
    assert sorted(from_cache) == [1, 2, 3, 4]
    for step in from_videos:  # the VAE's CPU kernels round differently with the batch size
        assert from_cache[step] == pytest.approx(from_videos[step], rel=1e-4)


def test_a_super_resolution_stage_trains_from_a_latent_cache_as_from_videos(setup, tmp_path):
    """A TSR's cache holds each clip's latent and that of its every other frame: the condition is
    then upsampled and augmented from the cache with the same draws as from pixels."""
    from dit_video.data import Shape
    from dit_video.data.latent_cache import cache_latents

    manifest = setup / "data/train/manifest.jsonl"
    clean = manifest.with_name("clean.jsonl")
    clean.write_text("".join(line + "\n" for line in manifest.read_text().splitlines() if "broken" not in line))
    tsr = ["stage=tsr", "cascade={temporal: 2}", "data.buckets=[{frames: 17, height: 32, width: 32, batch_size: 2}]",
           "train.steps=3"]
    cache_latents(clean, setup / "vae", [Shape(17, 32, 32)], tmp_path / "base_cache", progress=False)
    refused = run(setup, tmp_path / "refused", 1, *tsr, "data.videos=null", f"data.latents={tmp_path / 'base_cache'}",
                  check=False)
    assert refused.returncode == 2 and "17x32x32 holds no low-resolution latents" in refused.stderr
    assert "--cascade-spatial 1 --cascade-temporal 2" in refused.stderr
    cache_latents(clean, setup / "vae", [Shape(17, 32, 32)], tmp_path / "cache", cascade=(1, 2), progress=False)
    run(setup, tmp_path / "videos", 1, *tsr, f"data.videos={clean}")
    run(setup, tmp_path / "cached", 1, *tsr, "data.videos=null", f"data.latents={tmp_path / 'cache'}")
    from_videos, from_cache = losses(tmp_path / "videos"), losses(tmp_path / "cached")
    assert sorted(from_cache) == [1, 2, 3]
    for step in from_videos:
        assert from_cache[step] == pytest.approx(from_videos[step], rel=1e-4)


def test_joint_image_video_batches(setup, tmp_path):
    out = tmp_path / "joint"
    result = run(setup, out, 1, f"data.images={setup / 'images/manifest.jsonl'}", "data.image_ratio=0.5",
                 "data.image_buckets=[{frames: 1, height: 32, width: 32, batch_size: 4}]", "train.steps=6",
                 "preview.every=3", 'preview.prompts=["a red circle", "a blue square"]', "data.num_workers=2",
                 "train.tensorboard=true")
    table = [line.split() for line in (result.stdout + result.stderr).splitlines()]
    assert ["image", "1", "32", "32", "4", "4", "1", "50.0%"] in table  # the bucket table printed at start
    assert sorted(losses(out)) == list(range(1, 7))
    for step in (3, 6):  # sample videos from the EMA weights, the two prompts side by side
        assert read_video(out / f"samples/step_{step:08d}.mp4").shape == (3, 9, 32, 64)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 7))


@pytest.mark.parametrize("overrides, error", [
    (["data.buckets=[{frames: 8, height: 32, width: 32, batch_size: 2}]"], "data.buckets[0]: 8x32x32 does not fit"),
    (["backbone={name: unet3d, channels: 16, channel_mult: [1, 2], attention_levels: [1], head_dim: 8}"],
     "backbone config: num_channels (48) must be divisible by num_groups (32)"),  # a skip joined in the up path
    ([f"backbone={ROOT / 'configs/unet/unet3d_tiny.yaml'}", "train.compile=true"],
     "train.compile: only the transformer backbones (dit, dit3d) compile by block")])
def test_bad_config_is_one_line_and_exit_code_2(setup, tmp_path, overrides, error):
    result = run(setup, tmp_path / "bad", 1, *overrides, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {error}")
    assert not (tmp_path / "bad").exists()


def test_a_short_training_clearly_lowers_the_loss(setup, tmp_path):
    """Measured on fixed draws (clips, noise levels, noise) against the untrained model, which
    outputs exactly zero (adaLN-Zero): the trained one must do clearly better."""
    from dit_video.config import load_config
    from dit_video.diffusion import training_loss
    from dit_video.models.pretrained import DiffusionModel
    from dit_video.training.config import DiffusionTrainConfig
    from vae import VideoVAE

    out = tmp_path / "run"
    run(setup, out, 1, "train.steps=150", "train.checkpoint_every=150", "optim.lr=1e-3", "optim.warmup_steps=5",
        "optim.lr_schedule=constant", "data.buckets=[{frames: 9, height: 32, width: 32, batch_size: 4}]")
    model = DiffusionModel.from_pretrained(out / "model", weights="model")  # the folder stands on its own
    cfg, text = model.config, model.text_encoder
    vae = VideoVAE.from_pretrained(load_config(DiffusionTrainConfig, out / "model/train_config.yaml").vae).eval()
    entries = read_manifest(setup / "data/train/manifest.jsonl")[:6]
    with torch.no_grad():
        x = vae.encode(torch.stack([read_video(e.path, num_frames=9, size=(32, 32)) for e in entries]))
        text_tokens, mask = text([e.caption for e in entries])
        trained, untrained = ([training_loss(net, x, cfg.diffusion, torch.Generator().manual_seed(i), text=text_tokens,
                                             text_mask=mask).mean() for i in range(16)]
                              for net in (model.backbone, lambda z, logsnr, **_: torch.zeros_like(z)))
    trained, untrained = torch.stack(trained).mean().item(), torch.stack(untrained).mean().item()
    assert trained < 0.85 * untrained, (trained, untrained)  # measured: 0.74 against 0.99


def test_the_deepspeed_launcher_runs_the_same_training_as_torchrun(setup, tmp_path):
    import socket

    run(setup, tmp_path / "torchrun", 2, "train.steps=3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port)]
    command = [*launcher, str(ROOT / "train.py"), str(setup / "base.yaml"), f"out_dir={tmp_path / 'deepspeed'}",
               "train.steps=3"]  # the launcher adds --local_rank, which train.py accepts
    result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(tmp_path / "deepspeed") == losses(tmp_path / "torchrun")


def test_compiled_blocks_train_as_the_eager_ones(setup, tmp_path):
    """train.compile: the same losses as eager training, step for step (to float rounding), over
    both buckets' shapes, in two processes under ZeRO-3, which gathers the blocks' sharded weights
    around each call (ZeRO 0-2 leave the forward alone; compiling a run costs a minute on CPU)."""
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        result = run(setup, tmp_path / name, 2, "optim.zero=3", "train.steps=4", f"train.compile={compiled}")
        assert ("torch.compile: 2 backbone blocks" in result.stdout + result.stderr) == (name == "compiled")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(compiled) == [1, 2, 3, 4]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4), step
