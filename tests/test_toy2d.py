"""The demo: the samplers on a 2D mixture, drawn into a PNG, through its command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit_video.config import load_config
from dit_video.toy2d import Toy2DConfig, main, ring_mixture, run, sliced_wasserstein

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs/toy/samplers2d.yaml")


def test_demo_writes_a_picture_its_config_and_its_numbers(tmp_path, capsys):
    out = tmp_path / "figs" / "toy.png"
    main([TOY, f"out={out}", "num_samples=1000", "steps=[2, 32]", "samplers=[ddim, pc]"])
    image = Image.open(out)
    image.verify()
    pixels = np.asarray(Image.open(out).convert("L"))
    assert image.size[0] > 400 and image.size[1] > 400
    assert (pixels < 128).mean() > 0.01  # something is drawn on the white page
    cfg = load_config(Toy2DConfig, out.with_suffix(".yaml"))
    assert cfg.steps == [2, 32] and cfg.samplers == ["ddim", "pc"] and cfg.out == str(out)
    metrics = json.loads(out.with_suffix(".json").read_text())
    for name in ("ddim", "pc"):
        assert metrics["sliced_wasserstein"][name]["32"] < metrics["sliced_wasserstein"][name]["2"]
    # guidance towards the upper modes: at w = 0 the conditional model alone already lands there
    assert set(metrics["guidance_in_class"]) == {"0.0", "1.0", "3.0"}
    assert min(metrics["guidance_in_class"].values()) > 0.95
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["toy.json", "toy.png", "toy.yaml"]  # no temp files left


def test_sliced_wasserstein_sees_a_shift():
    gen = torch.Generator().manual_seed(0)
    a, _ = ring_mixture().sample(2000, generator=gen)
    b, _ = ring_mixture().sample(2000, generator=gen)
    same, shifted = sliced_wasserstein(a, b), sliced_wasserstein(a, b + torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert same < 0.05 and shifted > 4 * same


def _cli(*args, cwd):
    # The package is importable from the repo root even where it is not installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "dit_video.toy2d", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "never" / "x.png"
    for args in ([TOY, f"out={out}", "stepz=[3]"], [TOY, f"out={out}", "num_samples=-1"],
                 [str(tmp_path / "missing.yaml")], [TOY, f"out={tmp_path / 'x.gif'}"]):
        result = _cli(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr
    assert not out.parent.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _cli(TOY, f"out={blocker / 'x.png'}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_seed_decides_the_draws_and_an_empty_guidance_list_skips_guidance():
    small = dict(num_samples=64, steps=[2, 4], samplers=["pc"], guidance_weights=[])
    a = run(Toy2DConfig(seed=1, **small), progress=False)
    b = run(Toy2DConfig(seed=1, **small), progress=False)
    c = run(Toy2DConfig(seed=2, **small), progress=False)
    assert torch.equal(a["samples"]["pc", 4], b["samples"]["pc", 4])
    assert not torch.equal(a["samples"]["pc", 4], c["samples"]["pc", 4])
    assert a["guided"] == {} and a["in_class"] == {}
