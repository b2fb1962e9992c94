"""The generation pipeline and sample.py on a small untrained pipeline (tests/pipeline_checks.py):
the stage sizes, seeds, the wiring of extension and interpolation, and the command line."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from dit_video.config import ConfigError
from dit_video.data import read_video
from dit_video.pipeline import Pipeline, boundary_jump
from pipeline_checks import write_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is faster, and fair to a busy machine
    yield write_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder)


def test_each_stage_size_follows_from_the_output_size(pipe):
    assert [s.shape for s in pipe.stages] == [(5, 8, 8), (9, 8, 8), (9, 16, 16)]
    pipe.set_size(17, 32, 16)
    try:
        assert [s.shape for s in pipe.stages] == [(9, 16, 8), (17, 16, 8), (17, 32, 16)]
        assert pipe.temporal_step == 4 and pipe.context_frames() == 9
    finally:
        pipe.set_size(9, 16, 16)
    for frames, size in ((8, 16), (11, 16), (9, 10)):  # 8: not 1 + 2k; 11: base of 6 frames; 10: base of 5x5
        with pytest.raises(ValueError, match="does not fit"):
            pipe.set_size(frames, size, size)
    assert [s.shape for s in pipe.stages] == [(5, 8, 8), (9, 8, 8), (9, 16, 16)]  # a failed resize changes nothing


def test_a_prompt_gives_the_same_video_alone_or_in_a_batch(pipe):
    both = pipe.generate(["a red circle", "a blue square"], seed=3, progress=False)
    alone = pipe.generate(["a blue square"], seed=4, progress=False)  # video i uses seed + i
    assert both.shape == (2, 3, 9, 16, 16) and both.abs().max() <= 1
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
    assert (both[0] - both[1]).abs().mean() > 1e-3  # the prompt matters
    with pytest.raises(ValueError, match="empty"):
        pipe.generate(["a red circle", " "])


def test_guidance_and_sampler_settings_reach_every_stage(pipe):
    from dit_video.diffusion import GuidanceConfig, SamplerConfig

    plain = pipe.generate(["a red circle"], seed=0, progress=False)
    guided = pipe.generate(["a red circle"], seed=0, guidance=GuidanceConfig(weight=4.0), progress=False)
    stochastic = pipe.generate(["a red circle"], seed=0, sampler=SamplerConfig(sampler="pc", steps=3), progress=False)
    assert (plain - guided).abs().mean() > 1e-3 and (plain - stochastic).abs().mean() > 1e-3


def test_a_distilled_stage_keeps_its_steps_unless_steps_are_given(pipe, monkeypatch):
    """A sampler named alone changes the kind only; --steps changes every stage's steps."""
    import sample
    from dit_video.diffusion import SamplerConfig

    base, tsr = pipe.stages[:2]
    monkeypatch.setattr(base.model.config, "steps", 4)  # as if distilled to 4 steps
    assert pipe.stage_settings(base)[0] == SamplerConfig(sampler="ddim", steps=4)
    assert pipe.stage_settings(base, "pc")[0].steps == 4 and pipe.stage_settings(base, "pc")[0].sampler == "pc"
    assert pipe.stage_settings(tsr, "pc")[0] == SamplerConfig(sampler="pc", steps=3)  # the pipeline's steps
    assert pipe.stage_settings(base, SamplerConfig(sampler="pc", steps=2))[0].steps == 2
    assert sample.settings(sample.arguments(["--sampler", "pc"]), pipe)[0] == "pc"
    assert sample.settings(sample.arguments(["--steps", "2"]), pipe)[0] == SamplerConfig(sampler="ddim", steps=2)


def final_latents(pipe, monkeypatch):
    """What the last stage hands to the decoder, recorded on each generate."""
    seen, decode = [], pipe.vae.decode

    def recording(latent, *args, **kwargs):
        seen.append(latent.clone())
        return decode(latent, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", recording)
    return seen


@pytest.mark.parametrize("method", ["guided", "replacement"])
def test_each_new_chunk_begins_with_the_encoded_last_frames(pipe, monkeypatch, method):
    """The conditioning wiring: the last stage's latent of a new chunk starts exactly with the
    encoding of the frames it continues (reconstruction guidance returns x_a there), and only
    the new frames are handed out."""
    seen = final_latents(pipe, monkeypatch)
    chunks = list(pipe.extend(["a red circle"], 2, seed=0, method=method, progress=False))
    assert [c.shape[2] for c in chunks] == [9, 4, 4]  # 5 frames of context, 4 new ones per chunk
    video = torch.cat(chunks, dim=2)
    for i in (1, 2):
        context = pipe.vae.encode(video[:, :, 4 * i:4 * i + 5])  # the frames chunk i continued from
        torch.testing.assert_close(seen[i][:, :, :3], context, atol=1e-5, rtol=0)


def test_interpolation_is_pulled_toward_the_given_frames(pipe):
    """Keyframes the model can make (the ends of one of its own videos), interpolated from other
    noise: the guidance must bring the ends much closer to them than unguided sampling."""
    target = pipe.generate(["a red circle"], seed=7, progress=False)[0]
    keyframes = target[:, [0, -1]].transpose(0, 1)
    errors = {}
    for weight in (0.0, 100.0):
        chunks = list(pipe.interpolate(["a red circle"], torch.cat([keyframes, keyframes[:1]]), seed=0,
                                       weight=weight, progress=False))
        assert [c.shape[2] for c in chunks] == [9, 8]  # the shared keyframe once
        video = torch.cat(chunks, dim=2)[0]
        errors[weight] = (video[:, [0, 8]] - keyframes.transpose(0, 1)).abs().mean()
    assert errors[100.0] < 0.7 * errors[0.0], errors  # measured: 0.018 against 0.035 at the two ends


def test_boundary_jump_is_one_for_a_smooth_ramp_and_large_for_a_cut():
    ramp = torch.linspace(0, 1, 10).view(1, 1, 10, 1, 1).expand(2, 3, 10, 4, 4)
    assert torch.allclose(boundary_jump(ramp[:, :, :5], ramp[:, :, 5:]), torch.ones(2))
    cut = torch.cat([ramp[:, :, :5], ramp[:, :, 5:] + 1], dim=2)
    assert (boundary_jump(cut[:, :, :5], cut[:, :, 5:]) > 5).all()


def test_the_tiny_cascade_recipe_is_a_valid_pipeline_config():
    from dit_video.config import from_dict, read_yaml
    from dit_video.pipeline import PipelineConfig

    cfg = from_dict(PipelineConfig, read_yaml(ROOT / "configs/cascade/tiny/pipeline.yaml"))
    assert [s.model for s in cfg.stages] == ["base", "tsr"] and (cfg.frames, cfg.height) == (17, 64)


def test_missing_and_damaged_folders_are_one_line_errors(folder, tmp_path):
    with pytest.raises(ConfigError, match="not a pipeline folder"):
        Pipeline.from_pretrained(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "tsr" / "ema.safetensors").write_bytes(b"not weights")
    with pytest.raises(ConfigError, match="tsr/ema.safetensors: not a readable safetensors file"):
        Pipeline.from_pretrained(broken)
    shutil.copy(folder / "tsr" / "ema.safetensors", broken / "tsr")
    shutil.rmtree(broken / "ssr")
    with pytest.raises(ConfigError, match="ssr: no such model directory"):
        Pipeline.from_pretrained(broken)
    shutil.copytree(folder / "ssr", broken / "ssr")
    settings = yaml.safe_load((broken / "pipeline.yaml").read_text())
    (broken / "pipeline.yaml").write_text(yaml.safe_dump({**settings, "frames": 8}))
    with pytest.raises(ConfigError, match="broken: its default size 8x16x16 does not fit the pipeline: its ssr stage"):
        Pipeline.from_pretrained(broken)


def sample_py(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_sample_py_writes_the_videos_their_looks_and_the_settings(folder, tmp_path):
    (tmp_path / "prompts.txt").write_text("a blue square moving up\n\n")
    result = sample_py("--model", str(folder), "--prompt", "a red circle", "--prompts", "prompts.txt", "--out",
                       "out/clip.mp4", "--gif", "--sheet", "--seed", "5", "--sampler", "pc", "--steps", "2",
                       "--guidance", "3", "--oscillate", "1", "--extend", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["clip.yaml", "clip_0.gif", "clip_0.mp4", "clip_0.png",
                                                     "clip_1.gif", "clip_1.mp4", "clip_1.png"]
    assert read_video(out / "clip_1.mp4").shape == (3, 13, 16, 16)  # 9 frames, then 4 more
    with Image.open(out / "clip_0.gif") as gif:
        assert gif.n_frames == 13 and gif.size == (16, 16)
    with Image.open(out / "clip_0.png") as sheet:
        assert sheet.size == (9 * 16 + 8 * 2, 2 * 16 + 2)  # 13 frames: 9 to a row
    settings = yaml.safe_load((out / "clip.yaml").read_text())
    assert settings["prompts"] == ["a red circle", "a blue square moving up"] and settings["seed"] == 5
    assert all(s["sampler"]["sampler"] == "pc" and s["guidance"]["weight_low"] == 1 for s in settings["stages"])


def test_sample_py_a_disk_that_fails_while_writing_is_one_line_exit_2_and_leaves_nothing(folder, tmp_path,
                                                                                       monkeypatch, capsys):
    import sample

    def full_disk(path, *args):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(sample, "write_contact_sheet", full_disk)  # after the mp4s and gifs are complete
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "clip_1.png").write_bytes(b"an older run's sheet")  # not reached: stays as it was
    with pytest.raises(SystemExit) as exit:
        sample.main(["--model", str(folder), "--prompt", "a red circle", "--prompt", "a blue square", "--steps", "2",
                     "--gif", "--sheet", "--out", "out/clip.mp4"])
    err = capsys.readouterr().err
    last = err.split("\r")[-1].strip().splitlines()  # after the progress bars
    assert exit.value.code == 2 and last == ["error: [Errno 28] No space left on device: 'out/clip_0.png'"], err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["clip_1.png"]
    assert (tmp_path / "out" / "clip_1.png").read_bytes() == b"an older run's sheet"


def test_sample_py_size_rate_and_device_reach_the_file(folder, tmp_path, monkeypatch):
    import sample

    from dit_video.data import video_info

    thresholded = tmp_path / "thresholded"
    shutil.copytree(folder, thresholded)
    config = yaml.safe_load((thresholded / "pipeline.yaml").read_text())
    config["guidance"]["threshold_percentile"] = 0.99
    (thresholded / "pipeline.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    sample.main(["--model", str(thresholded), "--prompt", "a red circle", "--size", "16x32", "--fps", "4",
                 "--frames", "5", "--device", "cpu", "--guidance", "3", "--reconstruction-weight", "0",
                 "--out", "wide.mp4"])
    frames, fps, height, width = video_info(tmp_path / "wide.mp4")
    assert (frames, fps, height, width) == (5, 4.0, 16, 32)
    settings = yaml.safe_load((tmp_path / "wide.yaml").read_text())
    assert settings["size"] == [16, 32] and settings["fps"] == 4 and settings["device"] == "cpu"
    assert settings["reconstruction_weight"] == 0  # as given, not the pipeline's
    # --guidance sets the weight and keeps the pipeline's other guidance settings
    assert all(s["guidance"]["weight"] == 3 and s["guidance"]["threshold_percentile"] == 0.99
               for s in settings["stages"])


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a red circle", "--sampler", "euler"], "unknown sampler 'euler'"),
    (["--prompt", "a red circle", "--frames", "8"], "does not fit the pipeline"),
    (["--prompt", "  "], "empty prompt"),
    ([], "give a prompt"),
    (["--prompt", "a red circle", "--model", "nowhere"], "not a pipeline folder"),
    (["--prompt", "a red circle", "--out", "clip.avi"], "must end in .mp4"),
    (["--prompt", "a red circle", "--out", "a.png/clip.mp4"], "cannot write there"),
    (["--prompt", "a red circle", "--out", "/proc/clip.mp4"], "cannot write there"),
    (["--prompt", "a red circle", "--steps", "0"], "--steps must be a finite number >= 1, got 0"),
    (["--prompt", "a red circle", "--frames", "0"], "--frames must be a finite number >= 1, got 0"),
    (["--prompt", "a red circle", "--guidance", "nan"], "--guidance must be a finite number >= 0, got nan"),
    (["--prompt", "a red circle", "--oscillate", "inf"], "--oscillate must be a finite number >= 0, got inf"),
    (["--prompt", "a red circle", "--extend", "1", "--reconstruction-weight", "nan"], "--reconstruction-weight must"),
    (["--prompt", "a red circle", "--fps", "0"], "--fps must be a finite number > 0, got 0.0"),
    (["--prompt", "a red circle", "--size", "0x0"], "--size 0x0: height and width must be >= 1"),
    (["--prompt", "a red circle", "--seed", "99999999999999999999999"], "--seed must be in [0, 2^63 - 2^31)"),
    (["--prompt", "a red circle", "--device", "meta"], "--device meta: the project runs on cpu or cuda"),
    (["--prompt", "a red circle", "--interpolate", "a.png"], "2 or more images"),
    (["--prompt", "a red circle", "--interpolate", "a.png", "b.png"], "a.png: not a readable image"),
    (["--prompt", "a red circle", "--extend", "1", "--method", "replacement", "--interpolate", "a.png", "b.png"],
     "choose one"),
])
def test_sample_py_bad_input_is_one_line_exit_2_and_writes_nothing(folder, tmp_path, monkeypatch, capsys, args,
                                                                   message):
    import sample

    (tmp_path / "a.png").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)
    if "--model" not in args:
        args = ["--model", str(folder), *args]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit:
        sample.main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_library_errors_name_the_argument_not_a_command_line_flag(pipe):
    with pytest.raises(ValueError, match=r"^chunks must be >= 0, got -1$"):
        next(pipe.extend(["a red circle"], -1))
