"""Learning curves: each kept checkpoint's figures are the caption probe's on that checkpoint's EMA
weights (and the detector's on its samples), computed once and cached in the run's curve.json,
and plotted beside the loss; bad input is one line and exit code 2."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dit_video.config import save_config
from dit_video.data.buckets import BucketConfig
from dit_video.data.latent_cache import Shape, cache_latents
from dit_video.data.synthetic import generate
from dit_video.eval import learning_curve
from dit_video.eval.adherence import ATTRIBUTES
from dit_video.eval.caption_probe import attribute_identification, model_caption_denoiser, probe_clips
from dit_video.models.pretrained import DiffusionModel
from dit_video.training.config import DataConfig, DiffusionTrainConfig
from pipeline_checks import randomized, write_pipeline

LEVELS = ["-3", "0"]


def add_checkpoint(run, step, model, seed):
    folder = run / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    save_file(randomized(model, seed).trained_state(), folder / "ema.safetensors")
    (folder / "COMPLETE").write_text(f"{step}\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A run folder as train.py leaves it (config, metrics, two checkpoints) for the small base
    model of the pipeline tests, and a latent cache of synthetic clips at its size."""
    root = tmp_path_factory.mktemp("curve")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    write_pipeline(root / "pipeline", frames=5, size=16, stages=("base",))
    manifest = generate(root / "clips", "val", 8, frames=5, size=16, progress=False)
    cache_latents(manifest, root / "pipeline/vae", [Shape(5, 16, 16)], root / "cache", progress=False)
    base = DiffusionModel.from_pretrained(root / "pipeline/base")
    cfg = DiffusionTrainConfig(stage="base", out_dir=str(root / "run"), vae=str(root / "pipeline/vae"),
                               backbone=dict(base.config.backbone), text=base.config.text,
                               data=DataConfig(latents=str(root / "cache"), buckets=[BucketConfig(5, 16, 16, 2)]))
    run = root / "run"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 21)))
    for step, seed in ((10, 1), (20, 2)):
        add_checkpoint(run, step, base, seed)
    yield {"root": root, "run": run, "model": base}
    torch.set_num_threads(threads)


def args(setup, *extra):
    return [str(setup["run"]), "--latents", str(setup["root"] / "cache"), "--clips", "6", "--logsnr", *LEVELS, *extra]


def test_each_checkpoint_gets_the_probe_figures_of_its_weights(setup, capsys):
    learning_curve.main(args(setup))
    curve = json.loads((setup["run"] / "curve.json").read_text())
    assert sorted(curve["points"]) == ["10", "20"]
    latents, captions = probe_clips(setup["root"] / "cache", 6)
    for step, seed in (("10", 1), ("20", 2)):
        model = randomized(DiffusionModel(setup["model"].config), seed).eval()
        rows = attribute_identification(model_caption_denoiser(model), latents, captions, [-3.0, 0.0],
                                        torch.Generator().manual_seed(0))
        point = curve["points"][step]
        assert point["identification_rows"] == rows
        for a in ATTRIBUTES:
            assert point["identification"][a] == pytest.approx((rows[0]["accuracy"][a] + rows[1]["accuracy"][a]) / 2)
    assert curve["points"]["10"] != curve["points"]["20"]
    printed = capsys.readouterr().out
    assert "step     10  probe: shape" in printed and printed.strip().endswith(f"wrote {setup['run'] / 'curve.png'}")
    assert (setup["run"] / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_call_probes_only_new_checkpoints(setup, monkeypatch, tmp_path):
    learning_curve.main(args(setup))
    before = json.loads((setup["run"] / "curve.json").read_text())["points"]
    probed = []
    real = learning_curve.figures
    monkeypatch.setattr(learning_curve, "figures", lambda *a, **k: probed.append(1) or real(*a, **k))
    add_checkpoint(setup["run"], 30, setup["model"], 3)
    try:
        learning_curve.main(args(setup, "--out", str(tmp_path / "plot.png")))
        after = json.loads((setup["run"] / "curve.json").read_text())["points"]
        assert len(probed) == 1 and sorted(after) == ["10", "20", "30"]
        assert {k: after[k] for k in before} == before
        learning_curve.main(args(setup, "--seed", "1", "--out", str(tmp_path / "plot.png")))  # new settings: all anew
        assert len(probed) == 4
    finally:
        shutil.rmtree(setup["run"] / "checkpoints" / "step_00000030")
        (setup["run"] / "curve.json").unlink()


def test_samples_of_the_base_are_judged(setup, tmp_path):
    learning_curve.main(args(setup, "--prompts", "4", "--steps", "2", "--out", str(tmp_path / "plot.png")))
    curve = json.loads((setup["run"] / "curve.json").read_text())
    for point in curve["points"].values():
        assert set(point["adherence"]) == set(ATTRIBUTES)
        assert all(0 <= v <= 1 for v in point["adherence"].values())
    (setup["run"] / "curve.json").unlink()


@pytest.mark.parametrize("argv, message", [
    (lambda s: [str(s["root"] / "clips"), "--latents", str(s["root"] / "cache")], "not a training run (no config.yaml)"),
    (lambda s: [str(s["run"]), "--latents", str(s["root"] / "clips")], "not a latent cache"),
    (lambda s: args(s, "--clips", "0"), "need --clips >= 1"),
    (lambda s: args(s, "--out", "/proc/curve.png"), "/proc/curve.png: cannot write there"),
])
def test_bad_input_is_one_line_and_exit_2(setup, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        learning_curve.main(argv(setup))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1
