"""Backbone A/B experiments: width matching at a parameter budget, the arm's place in the evaluation
pipeline, the sample grid through a real decoder, and a whole experiment of two arms on a real
latent cache: its report, its refusal of changed settings, and its resume after an interruption,
also with each arm trained by two processes under torchrun and stopped by SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dit_video.cli import UsageError
from dit_video.config import load_config, read_yaml, save_config
from dit_video.data.latent_cache import Shape, cache_latents
from dit_video.data.synthetic import generate
from dit_video.data.video import read_video
from dit_video.eval.ab import (ABConfig, arm_configs, arm_pipeline, check_unchanged, describe_backbone, main,
                               separation, write_grid_video)
from dit_video.models.pretrained import DiffusionModel, DiffusionModelConfig
from dit_video.models.registry import WIDTH_KEYS, backbone_parameters, match_parameters
from dit_video.pipeline import Pipeline
from dit_video.text import TextConfig
from dit_video.training.checkpoint import complete_checkpoints
from dit_video.training.config import DiffusionTrainConfig
from pipeline_checks import write_pipeline

ROOT = Path(__file__).resolve().parents[1]

DIT = {"name": "dit", "width": 64, "depth": 2, "heads": 2, "in_channels": 4, "text_dim": 16, "patch": [1, 1, 1]}
UNET = {"name": "unet3d", "in_channels": 4, "text_dim": 16, "channel_mult": [1, 2], "blocks_per_level": 1,
        "attention_levels": [1], "head_dim": 16, "norm_groups": 8}


@pytest.mark.parametrize("arm", [{**DIT, "name": "dit3d"}, UNET, {**DIT, "depth": 3}])
def test_the_matched_width_has_the_closest_parameter_count_there_is(arm):
    target = backbone_parameters(DIT)
    matched = match_parameters(arm, target)
    key = WIDTH_KEYS[arm["name"]]
    gap = abs(backbone_parameters(matched) - target)
    for width in range(8, 4 * matched[key] + 1, 8):  # every width the backbone accepts is no closer
        try:
            count = backbone_parameters({**arm, key: width})
        except ValueError:
            continue
        assert abs(count - target) >= gap
    assert gap / target < 0.15
    assert {k: v for k, v in matched.items() if k != key} == {k: v for k, v in arm.items() if k != key}


def test_a_changed_setting_of_an_arm_is_refused_by_name(tmp_path):
    path = tmp_path / "arm.yaml"
    cfg = load_config(DiffusionTrainConfig, None, ["stage=base", "out_dir=x", "vae=v", "backbone=b.yaml",
                                                   "data.latents=c",
                                                   "data.buckets=[{frames: 5, height: 8, width: 8, batch_size: 2}]"])
    save_config(cfg, path)
    check_unchanged(path, cfg)  # the same: accepted
    check_unchanged(tmp_path / "missing.yaml", cfg)  # a new arm: accepted
    with pytest.raises(UsageError, match=r"ran with train.steps=1000, now 8 \(1 keys differ\)"):
        check_unchanged(path, load_config(DiffusionTrainConfig, path, ["train.steps=8"]))
    # written before a key existed (here train.compile): the key counts at its default
    saved = read_yaml(path)
    del saved["train"]["compile"]
    path.write_text(yaml.safe_dump(saved))
    check_unchanged(path, cfg)
    with pytest.raises(UsageError, match=r"ran with train.compile=False, now True"):
        check_unchanged(path, load_config(DiffusionTrainConfig, path, ["train.compile=true"]))
    saved["train"]["retired_key"] = 1  # a key since removed: differs by name
    path.write_text(yaml.safe_dump(saved))
    with pytest.raises(UsageError, match=r"arm config no longer loads \(.*train.retired_key"):
        check_unchanged(path, cfg)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return write_pipeline(tmp_path_factory.mktemp("ab") / "pipeline", frames=9, size=16)


def test_the_arm_takes_the_place_of_its_stage(pipeline_dir):
    reference = Pipeline.from_pretrained(pipeline_dir)
    base = DiffusionModel(DiffusionModelConfig("base", {**UNET, "text_dim": 16}, TextConfig(dim=16, depth=1, heads=2)))
    pipe = arm_pipeline(reference, base, cascade=True)
    assert pipe.stages[0].model is base
    assert [s.model for s in pipe.stages[1:]] == [s.model for s in reference.stages[1:]]
    assert (pipe.frames, pipe.height, pipe.width) == (9, 16, 16)
    alone = arm_pipeline(reference, base, cascade=False)
    assert len(alone.stages) == 1 and (alone.frames, alone.height, alone.width) == reference.stages[0].shape
    videos = alone.generate(["a red circle moving right on a gray background"], progress=False)
    assert videos.shape == (1, 3, *reference.stages[0].shape)
    with pytest.raises(UsageError, match="only for base arms, not ssr"):
        arm_pipeline(reference, reference.stages[2].model, cascade=False)


def test_the_grid_video_puts_each_video_in_its_tile(tmp_path):
    colors = torch.tensor([[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1]], dtype=torch.float32)
    videos = colors[:, :, None, None, None].expand(5, 3, 4, 16, 16).clone()
    videos[:, :, 2:] *= 0.5  # the frames change too
    write_grid_video(tmp_path / "grid.mp4", videos, fps=8, columns=3, gap=2)
    back = read_video(tmp_path / "grid.mp4")  # [3, T, H, W] through decord
    assert back.shape == (3, 4, 2 * 18 - 2, 3 * 18 - 2)
    for i, video in enumerate(videos):
        r, c = divmod(i, 3)
        tile = back[:, :, r * 18 + 3:r * 18 + 13, c * 18 + 3:c * 18 + 13]  # away from the edges (chroma bleeds)
        assert (tile.mean((2, 3)) - video.mean((2, 3))).abs().max() < 0.1
    assert back[:, :, 20:, 38:].mean() > 0.9  # the sixth tile is empty: white


@pytest.mark.parametrize("match", [True, False])
def test_match_parameters_false_keeps_each_arms_own_width(pipeline_dir, tmp_path, match):
    train = {"stage": "base", "out_dir": "unused", "vae": str(pipeline_dir / "vae"), "backbone": DIT,
             "data": {"latents": str(tmp_path), "buckets": [{"frames": 9, "height": 16, "width": 16, "batch_size": 2}]}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    experiment = {"train": str(tmp_path / "train.yaml"), "out_dir": str(tmp_path / "report"),
                  "arms": [{"name": "a", "backbone": DIT}, {"name": "b", "backbone": {**DIT, "name": "dit3d", "width": 32}}],
                  "eval": {"pipeline": str(pipeline_dir)}, "match_parameters": match}
    (tmp_path / "ab.yaml").write_text(yaml.safe_dump(experiment))
    configs = arm_configs(load_config(ABConfig, tmp_path / "ab.yaml"))
    assert configs["a"].backbone["width"] == 64 and configs["a"].out_dir == str(tmp_path / "report/runs/a")
    counts = [backbone_parameters(c.backbone) for c in configs.values()]
    if match:  # dit3d has no temporal attention: it matches dit's count at a larger width
        assert configs["b"].backbone["width"] == 72 and abs(counts[1] / counts[0] - 1) < 0.05
    else:
        assert configs["b"].backbone["width"] == 32 and counts[1] < counts[0] / 3


def test_the_report_names_what_tells_two_arms_apart():
    cross, joint = ({**DIT, "name": "dit3d", "text_attention": t} for t in ("cross", "joint"))
    assert describe_backbone(joint) == "dit3d (width 64, depth 2, heads 2, patch [1, 1, 1], text_attention joint)"
    assert describe_backbone(cross) != describe_backbone(joint)
    assert describe_backbone({**UNET, "channels": 32}).startswith("unet3d (channels 32, channel_mult [1, 2], ")


@pytest.mark.parametrize("change, message", [
    ({"train": "{root}/missing.yaml"}, "missing.yaml: no such config file"),
    ({"arms": [{"name": "a", "backbone": {"name": "dit"}}]}, "arms: give two arms at least"),
    ({"arms": [{"name": "a", "backbone": {"name": "dit"}}] * 2}, "arms: names must differ"),
    ({"arms": [{"name": "a/b", "backbone": {"name": "dit"}}, {"name": "c", "backbone": {"name": "dit"}}]},
     "names are folder names"),
    ({"arms": [{"name": "a", "backbone": {"name": "dit"}}, {"name": "b", "backbone": {"name": "mamba"}}]},
     "name: expected one of 'dit', 'dit3d', 'unet3d', got 'mamba'"),
    ({"eval": {"pipeline": "{root}/nowhere"}}, "not a pipeline folder"),
    ({"processes": 0}, "processes: expected an int >= 1, got 0"),
    ({"out_dir": "/proc/report"}, "/proc/report: cannot write there"),
])
def test_bad_input_is_one_line_and_exit_2(pipeline_dir, tmp_path, capsys, change, message):
    train = {"stage": "base", "out_dir": "unused", "vae": str(pipeline_dir / "vae"), "backbone": DIT,
             "data": {"latents": str(tmp_path), "buckets": [{"frames": 9, "height": 16, "width": 16, "batch_size": 2}]}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    experiment = {"train": str(tmp_path / "train.yaml"), "out_dir": str(tmp_path / "report"),
                  "arms": [{"name": "a", "backbone": DIT}, {"name": "b", "backbone": UNET}],
                  "eval": {"pipeline": str(pipeline_dir)}, **change}
    (tmp_path / "ab.yaml").write_text(yaml.safe_dump(experiment).replace("{root}", str(tmp_path)))
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "ab.yaml")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "report").exists()  # nothing written


def write_experiment(tmp_path, pipeline_dir, **changes):
    """ab.yaml for two small arms (dit, unet3d), four steps each, on the latents of 8 real
    synthetic clips; `changes` replace its top-level keys."""
    manifest = generate(tmp_path / "clips", "train", 8, frames=9, size=16, progress=False)
    cache_latents(manifest, pipeline_dir / "vae", [Shape(9, 16, 16)], tmp_path / "cache", progress=False)
    train = {"stage": "base", "out_dir": "unused", "vae": str(pipeline_dir / "vae"), "backbone": DIT,
             "text": {"encoder": "bytes", "dim": 16, "depth": 1, "heads": 2, "max_length": 48},
             "data": {"latents": str(tmp_path / "cache"), "buckets": [{"frames": 9, "height": 16, "width": 16,
                                                                       "batch_size": 2}]},
             "optim": {"zero": 2, "lr": 1e-3, "warmup_steps": 1},
             "train": {"steps": 4, "checkpoint_every": 2, "log_every": 1, "tensorboard": False,
                       "ema_decay": 0.5}}  # the EMA follows the weights within 4 steps
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    experiment = {"train": str(tmp_path / "train.yaml"), "out_dir": str(tmp_path / "report"),
                  "arms": [{"name": "dit", "backbone": {k: v for k, v in DIT.items() if k not in ("in_channels", "text_dim")}},
                           {"name": "unet", "backbone": {k: v for k, v in UNET.items() if k not in ("in_channels", "text_dim")}}],
                  "eval": {"pipeline": str(pipeline_dir), "prompts": 4, "grid": 2, "latents": str(tmp_path / "cache"),
                           "probe_clips": 4, "probe_logsnr": [0.0, 2.0], "sampler": {"steps": 2}, "device": "cpu"},
                  **changes}
    (tmp_path / "ab.yaml").write_text(yaml.safe_dump(experiment))
    return tmp_path / "ab.yaml"


@pytest.mark.slow
def test_an_experiment_reports_and_resumes(pipeline_dir, tmp_path, monkeypatch, capfd):
    """Two arms; then the second arm loses its last checkpoint and its export (an interruption):
    the same command resumes it."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_experiment(tmp_path, pipeline_dir)
    main([str(tmp_path / "ab.yaml")])
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    arms = report["arms"]
    assert list(arms) == ["dit", "unet"]
    # the arms trained the same run but for the backbone, at one parameter budget
    configs = {name: yaml.safe_load((out / f"arms/{name}.yaml").read_text()) for name in arms}
    differ = {k for k in configs["dit"] if configs["dit"][k] != configs["unet"][k]}
    assert differ == {"backbone", "out_dir"}
    counts = [a["train"]["parameters"] for a in arms.values()]
    assert abs(counts[1] / counts[0] - 1) < 0.15 and configs["unet"]["backbone"]["channels"] != 32
    for a in arms.values():
        assert a["train"]["steps"] == [1, 2, 3, 4] and a["train"]["samples_per_s"] > 0
        assert a["train"]["peak_memory_mib"] > 100 and a["train"]["train_tflops"] > 0
        assert a["eval"]["adherence"]["clips"] == 4 and [r["logsnr"] for r in a["eval"]["denoising"]] == [0.0, 2.0]
        assert all(r["mse"]["true"] > 0 for r in a["eval"]["denoising"])
        # the probe's learning curve: every checkpoint the arm kept, each attribute a share
        assert list(a["eval"]["curve"]) == ["2", "4"]
        assert all(0 <= v <= 1 for point in a["eval"]["curve"].values() for v in point.values())
    # the same prompts and seeds: two arms, two different models, two different grids
    grids = {name: read_video(out / f"samples/{name}.mp4") for name in arms}
    assert grids["dit"].shape == grids["unet"].shape == (3, 9, 16, 2 * 16 + 2)
    assert (grids["dit"] - grids["unet"]).abs().mean() > 1e-3
    markdown = (out / "report.md").read_text()
    assert "| dit | dit (width 64" in markdown and "| unet | unet3d (channels" in markdown
    assert "![training loss](loss.png)" in markdown and (out / "loss.png").stat().st_size > 10_000
    assert (out / "samples.png").stat().st_size > 10_000
    lo, hi = arms["dit"]["eval"]["adherence"]["interval"]["direction"]
    assert f"({100 * lo:.0f}-{100 * hi:.0f})" in markdown and "Direction: the intervals" in markdown
    assert "| dit | direction | " in markdown and (out / "curve.png").stat().st_size > 10_000

    # an interruption of the second arm after step 2: the same command resumes it there
    dit_checkpoint = tmp_path / "report/runs/dit/checkpoints/step_00000004"
    dit_time = dit_checkpoint.stat().st_mtime_ns
    unet = out / "runs/unet"
    for path in (unet / "checkpoints/step_00000004", unet / "model"):
        for file in sorted(path.rglob("*"), reverse=True):
            file.unlink() if file.is_file() else file.rmdir()
        path.rmdir()
    capfd.readouterr()
    main([str(tmp_path / "ab.yaml")])
    logged = capfd.readouterr()
    assert "resumed from" in logged.out + logged.err and "step_00000002" in logged.out + logged.err
    assert dit_checkpoint.stat().st_mtime_ns == dit_time  # the finished arm was left alone
    again = json.loads((out / "report.json").read_text())["arms"]
    assert again["unet"]["train"]["steps"] == [1, 2, 3, 4]
    assert again["dit"] == arms["dit"]  # its evaluation came from the cache

    # another number of steps is another experiment: refused, one line, exit 2
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "ab.yaml"), "overrides=[train.steps=6]"])
    err = capfd.readouterr().err
    assert exit.value.code == 2 and "this experiment ran with train.steps=4, now 6" in err and err.count("\n") == 1
    assert sorted(os.listdir(unet / "checkpoints")) == ["step_00000002", "step_00000004"]  # nothing trained


@pytest.mark.slow
def test_arms_train_under_torchrun_stop_on_sigterm_and_resume(pipeline_dir, tmp_path, capfd):
    """processes: 2 trains each arm in two processes (a global batch of twice the buckets'). A
    SIGTERM stops the experiment cleanly, with every process's state in a checkpoint; the arm
    resumes only with the number of processes it started with."""
    config = write_experiment(tmp_path, pipeline_dir, processes=2,
                              overrides=["train.steps=200", "train.checkpoint_every=1000"])
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "dit_video.eval.ab", str(config)]
    out, metrics = tmp_path / "report", tmp_path / "report/runs/dit/metrics.jsonl"
    with open(tmp_path / "log", "w+") as log:
        ab = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not (metrics.exists() and metrics.read_text()) and ab.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        ab.send_signal(signal.SIGTERM)  # the first arm has trained a step
        assert ab.wait(timeout=120) == 1
        log.seek(0)
        printed = log.read()
    assert "stopped: dit at step" in printed and "Traceback" not in printed
    [checkpoint] = complete_checkpoints(out / "runs/dit/checkpoints")
    state = json.loads((checkpoint / "trainer.json").read_text())
    assert state["world"] == 2 and 0 < state["step"] < 200

    capfd.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([str(config), "processes=1"])
    err = capfd.readouterr().err
    assert exit.value.code == 2 and "this arm trained with 2 processes, now 1" in err and err.count("\n") == 1

    resumed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoint}" in resumed.stdout + resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["shared"]["processes"] == 2 and report["shared"]["batch"] == "4"
    assert "200 steps of batch 4 (9x16x16; 2 processes)" in (out / "report.md").read_text()
    for arm in report["arms"].values():
        assert arm["train"]["steps"][-1] == 200 and arm["train"]["samples_per_s"] > 0


def test_separation_names_the_pairs_whose_intervals_do_not_overlap():
    assert separation({"a": [0.8, 0.95], "b": [0.2, 0.4], "c": [0.3, 0.85]}) == \
        "the intervals separate for a above b; the other pairs overlap"
    assert separation({"a": [0.1, 0.3], "b": [0.5, 0.7]}) == "the intervals separate for a below b"
    assert "overlap: this evaluation does not tell them apart" in separation({"a": [0.1, 0.6], "b": [0.5, 0.7]})
