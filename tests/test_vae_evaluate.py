"""python -m vae.evaluate: PSNR/SSIM of a VAE's reconstructions, its report, and bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dit_video.data import read_video, write_video
from dit_video.eval import psnr
from vae import VideoVAE
from vae.evaluate import evaluate, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/vae/tiny.yaml"


def sweeping_bar(frames=9, height=40, width=56, color=(0.8, -0.4, 0.2)):
    """A colored vertical bar moving right over a horizontal gray ramp, pixels in [-0.6, 0.8]."""
    video = torch.linspace(-0.6, 0.6, width).expand(3, frames, height, width).clone()
    for t in range(frames):
        video[:, t, :, 3 * t:3 * t + 8] = torch.tensor(color)[:, None, None]
    return video


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    return VideoVAE.from_config(TINY).save_pretrained(tmp_path_factory.mktemp("tiny_vae"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return [str(write_video(folder / "bar.mp4", sweeping_bar())),
            str(write_video(folder / "blue_bar.mp4", sweeping_bar(frames=12, color=(-0.5, 0.1, 0.9))))]


def test_the_report_has_one_row_per_clip_and_their_average(model_dir, clips, tmp_path, capsys):
    out = tmp_path / "reports" / "tiny.json"
    main(["--model", str(model_dir), "--videos", *clips, "--frames", "5", "--size", "32", "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["clips"]
    assert [row["video"] for row in rows] == clips
    for row in rows:
        assert math.isfinite(row["psnr"]) and -1 <= row["ssim"] <= 1
    for key in ("psnr", "ssim"):
        assert report["average"][key] == pytest.approx(sum(row[key] for row in rows) / len(rows))
    assert report["arguments"] == {"model": str(model_dir), "videos": clips, "frames": 5, "size": 32,
                                   "device": "cpu", "out": str(out)}
    printed = capsys.readouterr().out
    assert "bar.mp4" in printed and "blue_bar.mp4" in printed and "average" in printed and f"wrote {out}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.json"]  # no temporary file left


class StubVAE(torch.nn.Module):
    """Encodes to the pixels themselves and decodes with a shift: a reconstruction of known error."""

    temporal_factor, spatial_factor = 4, 8

    def __init__(self, shift=0.0):
        super().__init__()
        self.shift, self.seen = shift, []

    def encode(self, video):
        self.seen.append(tuple(video.shape))
        return video

    def decode(self, latent):
        return latent + self.shift


def test_evaluate_compares_each_clip_with_its_reconstruction(clips):
    perfect = evaluate(StubVAE(), clips, frames=9, size=32, device="cpu")
    assert [row["psnr"] for row in perfect] == [math.inf, math.inf]
    assert [row["ssim"] for row in perfect] == pytest.approx([1.0, 1.0], abs=1e-6)
    shifted = StubVAE(shift=-0.1)  # no pixel goes below -0.7: no clamping
    rows = evaluate(shifted, clips, frames=9, size=32, device="cpu")
    assert [row["psnr"] for row in rows] == pytest.approx([10 * math.log10(4 / 0.01)] * 2, abs=1e-3)
    assert all(row["ssim"] < 1 for row in rows)
    assert shifted.seen == [(1, 3, 9, 32, 32)] * 2  # first 9 frames, center 32 x 32 crop
    clamped = evaluate(StubVAE(shift=5.0), clips[:1], frames=5, size=32, device="cpu")[0]
    clip = read_video(clips[0], num_frames=5, size=(32, 32))[None]
    assert clamped["psnr"] == pytest.approx(psnr(torch.ones_like(clip), clip).item())  # clamped to white


def test_bad_input_in_process_is_one_line_and_writes_nothing(model_dir, clips, tmp_path, capsys):
    out = tmp_path / "never" / "report.json"
    common = ["--model", str(model_dir), "--out", str(out), "--size", "32"]
    cases = {
        "has 9 frames, --frames asks for 13": [*common, "--videos", clips[0], "--frames", "13"],
        "no clips to evaluate": common,
        "is a directory": ["--model", str(model_dir), "--videos", clips[0], "--frames", "5", "--out", str(tmp_path)],
        "not a torch device": [*common, "--videos", clips[0], "--frames", "5", "--device", "gpu0"],
    }
    for expected, argv in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and expected in err, (expected, err)
        assert len(err.strip().splitlines()) == 1
    assert not out.parent.exists()


def test_bad_input_from_the_command_line_is_one_line_exit_2_and_writes_nothing(model_dir, clips, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(3000))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = tmp_path / "out" / "report.json"
    good = ["--videos", clips[0], "--frames", "5", "--size", "32"]
    cases = {  # what the one line must name -> arguments
        str(tmp_path / "no_model"): ["--model", str(tmp_path / "no_model"), *good, "--out", str(out)],
        str(corrupt): ["--model", str(model_dir), *good, "--videos", str(corrupt), "--out", str(out)],
        "1 + 4*k frames": ["--model", str(model_dir), *good, "--frames", "8", "--out", str(out)],
        "spatial factor 8": ["--model", str(model_dir), *good, "--size", "36", "--out", str(out)],
        str(blocker): ["--model", str(model_dir), *good, "--out", str(blocker / "report.json")],
    }
    # The package is importable from the repo root even where it is not installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    runs = {expected: subprocess.Popen([sys.executable, "-m", "vae.evaluate", *argv], cwd=tmp_path, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for expected, argv in cases.items()}  # all at once: each run is mostly importing torch
    for expected, run in runs.items():
        _, err = run.communicate(timeout=120)
        assert run.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
        assert "Traceback" not in err
    assert not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "corrupt.mp4"]
