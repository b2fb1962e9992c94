"""train.py's distill stage: a tiny teacher folder (a randomized tiny dit, so its predictions are
not the adaLN-Zero zeros, and an untrained tiny VAE), a few synthetic clips, and
configs/distill_example.yaml pointed at them.

Fast: the student starts as the teacher (same outputs for every guidance weight; for a
super-resolution teacher, the same condition), and bad runs are one line with exit code 2 before
anything is written. Slow: two real rounds through train.py's loop (guided 8 -> 4 steps from clips,
then 4 -> 2 from a latent cache); the first round's first logged loss is recomputed with the
teacher's own modules in the student's place.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dit_video.config import load_config, read_yaml
from dit_video.data.synthetic import generate
from dit_video.diffusion import CascadeConfig, DiffusionConfig, sample
from dit_video.models.pretrained import DiffusionModel, DiffusionModelConfig
from dit_video.text import TextConfig
from dit_video.training.config import DistillTrainConfig
from dit_video.training.objective import DistillObjective
from dit_video.training.stages import DistillStage
from train import main

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = {"name": "dit", "size": "tiny", "in_channels": 4, "text_dim": 32, "patch": [1, 2, 2],
            "attention_backend": "math"}


def save_teacher(folder: Path, steps: int | None = None, guidance_input: bool = False,
                 prediction: str = "v", cascade: CascadeConfig | None = None) -> Path:
    torch.manual_seed(0)
    backbone = {**BACKBONE, "guidance_input": guidance_input, "cond_channels": 4 if cascade else 0}
    model = DiffusionModel(DiffusionModelConfig("ssr" if cascade else "base", backbone,
                                                TextConfig(dim=32, depth=1, heads=2, max_length=48),
                                                DiffusionConfig(prediction=prediction), cascade, steps=steps))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.save_pretrained(folder, ema_state=model.trained_state())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from vae import VideoVAE

    folder = tmp_path_factory.mktemp("distill")
    generate(folder / "data", "train", count=4, frames=9, size=32, progress=False)
    torch.manual_seed(0)
    VideoVAE.from_config(ROOT / "configs/vae/tiny.yaml").save_pretrained(folder / "vae")
    save_teacher(folder / "teacher")
    save_teacher(folder / "distilled", steps=4, guidance_input=True)
    config = yaml.safe_load((ROOT / "configs/distill_example.yaml").read_text())
    config.update(teacher=str(folder / "teacher"), vae=str(folder / "vae"), student_steps=4)
    config["data"].update(videos=str(folder / "data/train/manifest.jsonl"),
                          buckets=[{"frames": 9, "height": 32, "width": 32, "batch_size": 2}])
    config["optim"].update(lr=1e-3)
    config["train"].update(steps=3, checkpoint_every=3, log_every=1, tensorboard=False)
    (folder / "distill.yaml").write_text(yaml.safe_dump(config))
    return folder


def run_config(setup: Path, *overrides: str) -> DistillTrainConfig:
    return load_config(DistillTrainConfig, setup / "distill.yaml", list(overrides))


def test_the_student_starts_as_its_teacher(setup, tmp_path):
    """Loaded with the teacher's weights, the new guidance input adds exactly 0: same outputs."""
    stage = DistillStage(run_config(setup, f"out_dir={tmp_path}"), 0, 1, torch.device("cpu"),
                         torch.Generator().manual_seed(0))
    assert stage.model.backbone.config.guidance_input and not stage.teacher.guidance_input
    assert not any(p.requires_grad for p in stage.teacher.parameters())
    z, logsnr = torch.randn(3, 4, 3, 4, 4), torch.tensor([-3.0, 0.0, 4.0])
    text, mask = stage.teacher.encode_text(["a red circle", "", "a blue square moving left"])
    with torch.no_grad():
        reference = stage.teacher.backbone(z, logsnr, text=text, text_mask=mask)
        assert reference.abs().mean() > 0.1
        for w in (0.0, 2.5, 4.0):
            student = stage.model.backbone(z, logsnr, text=text, text_mask=mask, guidance=torch.full((3,), w))
            assert torch.equal(student, reference)
        caption = ["a red circle"]
        assert torch.equal(stage.model.text_encoder(caption)[0], stage.teacher.encode_text(caption)[0])
    inputs = stage.inputs(next(iter(stage.loader)), 0)
    assert set(inputs) == {"z", "logsnr", "target", "captions", "is_image", "guidance"}
    assert 0 <= inputs["guidance"].min() and inputs["guidance"].max() <= 4
    assert not any(p.exists() for p in tmp_path.iterdir())  # building a stage writes nothing


def test_a_super_resolution_teacher_and_its_student_see_the_same_augmented_condition(setup, tmp_path):
    teacher = save_teacher(tmp_path / "ssr", cascade=CascadeConfig(spatial=2))
    cfg = run_config(setup, f"out_dir={tmp_path / 'run'}", f"teacher={teacher}", "guidance.weights=null")
    stage = DistillStage(cfg, 0, 1, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert not stage.model.backbone.config.guidance_input
    inputs = stage.inputs(next(iter(stage.loader)), 0)
    assert inputs["cond"].shape == inputs["z"].shape and inputs["cond_logsnr"].shape == (2,)
    text, mask = stage.teacher.encode_text(inputs["captions"])
    with torch.no_grad():
        args = (inputs["z"], inputs["logsnr"])
        kwargs = dict(text=text, text_mask=mask, cond=inputs["cond"], cond_logsnr=inputs["cond_logsnr"])
        assert torch.equal(stage.model.backbone(*args, **kwargs), stage.teacher.backbone(*args, **kwargs))
        assert torch.isfinite(stage.model(**inputs)["loss"])


def bad_run(setup: Path, out: Path, capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(setup / "distill.yaml"), f"out_dir={out}", *overrides])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert not out.exists()
    return lines[0]


def test_bad_runs_are_one_line_and_exit_code_2_before_anything_is_written(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert "teacher: " in bad_run(setup, out, capsys, f"teacher={tmp_path / 'nowhere'}")
    distilled = f"teacher={setup / 'distilled'}"
    assert "distilled for 4 sampling steps, so student_steps must be 2" in bad_run(setup, out, capsys, distilled)
    assert "set guidance.weights" in bad_run(setup, out, capsys, distilled, "student_steps=2", "guidance.weights=null")
    eps = save_teacher(tmp_path / "eps", prediction="eps")
    assert "predicts eps" in bad_run(setup, out, capsys, f"teacher={eps}")
    assert "unknown key (did you mean 'weights'?)" in bad_run(setup, out, capsys, "guidance.weight=[0, 1]")
    assert "must be [low, high]" in bad_run(setup, out, capsys, "guidance.weights=[2, 1]")
    assert "does not fit" in bad_run(setup, out, capsys, "data.buckets=[{frames: 8, height: 32, width: 32, "
                                                         "batch_size: 1}]")


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(setup: Path, *overrides: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), str(setup / "distill.yaml"), *overrides],
                            env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_rounds_through_train_py(setup, tmp_path):
    from dit_video.data import Shape
    from dit_video.data.latent_cache import cache_latents

    first = tmp_path / "round1"
    train(setup, f"out_dir={first}")
    assert sorted(losses(first)) == [1, 2, 3]
    # The first step's loss, recomputed on the same batch and draws with the teacher's backbone and
    # text encoder in the student's place (so without w, which the student ignores at init).
    stage = DistillStage(run_config(setup, f"out_dir={tmp_path / 'unused'}"), 0, 1, torch.device("cpu"),
                         torch.Generator().manual_seed(0))  # train.py's generator for seed 0, rank 0
    inputs = stage.inputs(next(iter(stage.loader)), 0)
    inputs.pop("guidance")
    teacher = DistillObjective(stage.teacher.backbone, "v", stage.teacher.text_encoder)
    with torch.no_grad():
        assert teacher(**inputs)["loss"].item() == pytest.approx(losses(first)[1], rel=1e-5)

    model = DiffusionModel.from_pretrained(first / "model")
    assert model.config.steps == 4 and model.guidance_input and model.config.stage == "base"
    assert model.config.diffusion.weighting == "truncated_snr"  # what the student was trained with
    assert read_yaml(first / "model/train_config.yaml")["stage"] == "distill"

    # round 2 from a latent cache: teacher = round 1's export, 4 -> 2 steps
    cache_latents(setup / "data/train/manifest.jsonl", setup / "vae", [Shape(9, 32, 32)], tmp_path / "cache",
                  progress=False)
    second = tmp_path / "round2"
    train(setup, f"out_dir={second}", f"teacher={first / 'model'}", "student_steps=2", "train.steps=2",
          "data.videos=null", f"data.latents={tmp_path / 'cache'}")
    assert sorted(losses(second)) == [1, 2]
    student = DiffusionModel.from_pretrained(second / "model")
    assert student.config.steps == 2 and student.guidance_input
    text, mask = student.encode_text(["a red circle", "a blue square"])
    denoiser = student.denoiser()
    video = sample(lambda z, logsnr: denoiser(z, logsnr, text=text, text_mask=mask, guidance=torch.tensor([0.0, 3.0])),
                   torch.randn(2, 4, 3, 4, 4), steps=student.config.steps)
    assert video.shape == (2, 4, 3, 4, 4) and torch.isfinite(video).all()


@pytest.mark.slow
def test_a_compiled_run_compiles_the_teacher_and_its_targets_are_the_eager_ones(setup, tmp_path):
    """train.compile compiles the frozen teacher's blocks beside the student's: the teacher makes
    every step's target in two guided steps (four forwards), more work than the student's one."""
    stages = [DistillStage(run_config(setup, f"out_dir={tmp_path / mode}", f"train.compile={mode == 'compiled'}"),
                           0, 1, torch.device("cpu"), torch.Generator().manual_seed(0))
              for mode in ("eager", "compiled")]
    eager, compiled = stages
    assert (eager.compiled_blocks, compiled.compiled_blocks) == (0, 4)  # tiny dit: 2 blocks, twice
    assert all(getattr(block, "_compiled_call_impl", None) is not None for block in compiled.teacher.backbone.blocks)
    from torch._dynamo.utils import counters

    counters.clear()
    batch = next(iter(eager.loader))
    expected, got = eager.inputs(batch, 0), compiled.inputs(batch, 0)
    assert "guidance" in got  # the example config distills guidance: the teacher runs guided
    torch.testing.assert_close(got["target"], expected["target"], rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
