"""The benchmarks measure what they say: every stage of a real pipeline is timed on its own code
path and the parts add up to the whole; diffusers' Latte and CogVideoX are built at our width,
depth, heads and patch and take our input; the report command writes its JSON with the machine
named; a CPU worker's peak memory is its own, not its parent's; bad input is one line, exit 2.
Real computations at tiny sizes, no thresholds on speed."""

import json
import re
from pathlib import Path

import pytest
import torch

from bench import backbones, report, sampling, training
from dit_video.diffusion import SamplerConfig
from dit_video.models.flops import count_flops, count_parameters
from dit_video.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--width", "32", "--depth", "2", "--heads", "2", "--size", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is faster, and fair to a busy machine
    yield
    torch.set_num_threads(threads)


def test_sampling_times_each_stage_on_the_pipelines_own_path():
    pipe = Pipeline.from_pretrained(ROOT / "checkpoints/tiny")
    pipe.set_size(9, 32, 32)  # half the frames and side: a quarter of the VAE decode's time
    sampler = SamplerConfig(steps=2)
    result = sampling.measure(pipe, [sampling.PROMPT], sampler, repeats=1, progress=False)
    assert [s["stage"] for s in result["stages"]] == ["base", "tsr"]
    for s in result["stages"]:
        assert s["steps"] == 2 and s["evaluations"] >= 2 and s["seconds"] > 0 and s["text_s"] > 0
        assert s["per_step_s"] == pytest.approx(s["seconds"] / 2)
    parts = result["text_s"] + sum(s["seconds"] for s in result["stages"]) + result["decode_s"]
    assert 0.9 * result["total_s"] < parts <= result["total_s"]
    # the timers pass everything through and are gone afterwards
    with sampling.timed_calls(pipe):
        timed = pipe.generate([sampling.PROMPT], sampler=sampler, progress=False)
    assert not {"_sample_stage", "decode", "encode_text"} & (vars(pipe).keys() | vars(pipe.vae).keys()
                                                            | vars(pipe.stages[0].model).keys())
    torch.testing.assert_close(pipe.generate([sampling.PROMPT], sampler=sampler, progress=False), timed,
                               rtol=0, atol=0)


def test_diffusers_arms_have_our_width_depth_heads_and_input():
    pytest.importorskip("diffusers")
    args = backbones.parser().parse_args(TINY)
    frames = 3
    z_ours, text_ours = backbones.inputs("dit", args, frames, "cpu", torch.float32)
    for arm, ours in (("latte", "dit"), ("cogvideox", "dit3d")):  # each at the width of our arm it pairs with
        cfg = backbones.build(arm, args, frames).config
        width = backbones.build(ours, args, frames).config.width
        assert (cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers) == (width, args.depth)
        assert (cfg.num_attention_heads, cfg.patch_size, cfg.in_channels) == (args.heads, 2, 4)
    for arm in ("dit", "dit3d", "latte", "cogvideox"):
        z, text = backbones.inputs(arm, args, frames, "cpu", torch.float32)
        torch.testing.assert_close(z.transpose(1, 2) if arm == "cogvideox" else z, z_ours, rtol=0, atol=0)
        assert torch.equal(text, text_ours)
        with torch.no_grad():
            assert backbones.forward(arm, backbones.build(arm, args, frames), z, text).shape == z.shape
    # at the benchmark's own size, dit and Latte have the same number of parameters
    default = backbones.parser().parse_args([])
    with torch.device("meta"):
        dit, latte = (sum(p.numel() for p in backbones.build(arm, default, 8).parameters()) for arm in ("dit", "latte"))
    assert latte == pytest.approx(dit, rel=0.01)
    # our three arms at matched parameter counts: dit3d and the U-Net at the widths closest to dit's
    # count that their steps allow (48 and 16 channels here: within 13%); or, with --match width,
    # dit3d at dit's width
    with torch.device("meta"):
        count = {arm: count_parameters(backbones.build(arm, default, 8)) for arm in ("dit", "dit3d", "unet3d")}
    for arm in ("dit3d", "unet3d"):
        assert count[arm] == pytest.approx(count["dit"], rel=0.13)
    by_width = backbones.parser().parse_args(["--match", "width"])
    assert backbones.build("dit3d", by_width, 8).config.width == by_width.width
    # the FLOP count of the diffusers arms is the one that gives count_flops for ours; our arms
    # take the text as their counterparts do unless told otherwise
    for arm, text_attention in (("dit", "cross"), ("dit3d", "joint")):
        ours = backbones.build(arm, args, frames)
        assert ours.config.text_attention == text_attention
        assert backbones.forward_flops(arm, args, frames) == count_flops(ours, tuple(z_ours.shape), backbones.TEXT_LEN)
    cross = backbones.parser().parse_args(TINY + ["--text-attention", "cross"])
    assert backbones.build("dit3d", cross, frames).config.text_attention == "cross"


def test_compile_reaches_every_transformer_block_of_every_arm():
    """--compile compiles each arm's repeated blocks, theirs (Latte's spatial and temporal ones)
    as ours; compiling is lazy, so nothing runs here."""
    pytest.importorskip("diffusers")
    args = backbones.parser().parse_args(TINY)
    for arm, blocks in (("dit", args.depth), ("dit3d", args.depth), ("latte", 2 * args.depth),
                        ("cogvideox", args.depth)):
        model = backbones.build(arm, args, 3)
        backbones.compile_transformer(arm, model)
        compiled = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(compiled) == blocks, arm


def test_ratios_are_ours_over_theirs():
    rows = [{"arm": "dit", "frames": 4, "step_s": 1.0, "tflops": 2.0},
            {"arm": "latte", "frames": 4, "step_s": 2.0, "tflops": 3.0},
            {"arm": "dit3d", "frames": 8, "step_s": 1.0, "tflops": 1.0}]  # no cogvideox: no such pairs
    assert backbones.ratios(rows) == [{"pair": "dit/latte", "frames": 4, "step_time": 0.5, "time_per_flop": 1.5}]


def test_a_cpu_workers_peak_memory_is_its_own():
    """Linux hands a parent's peak resident set on to its children through fork and exec; the
    worker must not report this test process's size."""
    ballast = torch.ones(512 * 2**20 // 4)  # 512 MiB resident here
    args = backbones.parser().parse_args(TINY)
    peak = backbones.memory("dit", args, 2)
    assert abs(peak) < 64 * 2**20 and ballast[0] == 1


def test_the_quick_report_writes_json_that_names_the_machine(tmp_path):
    out = report.main(["--quick", "--out", str(tmp_path / "report.json")])
    result = json.loads(out.read_text())
    assert re.fullmatch(r".+ CPU, \d+ cores, \d+ threads?", result["machine"]) and result["device"] == "cpu"
    rows = result["training"]["rows"]
    assert {(r["arm"], r["frames"]) for r in rows} >= {(a, f) for a in ("dit", "dit3d", "unet3d") for f in (2, 4)}
    assert all(r["tokens_per_s"] > 0 and r["forward_gflop"] > 0 for r in rows)
    assert {r["backend"] for r in result["attention"]["rows"]} == {"math", "sdpa"}
    assert result["sampling"]["model"] == "checkpoints/tiny"
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_training_throughput_runs_train_py_on_cached_latents_eager_and_compiled(tmp_path):
    """train.py really trains in both modes, from the same cache: the same losses, step for step;
    the runs' folders (checkpoints, exports) are gone once read."""
    out = training.main(["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "training.json")])
    result = json.loads(out.read_text())
    assert result["latent_shape"] == [4, 3, 4, 4] and result["tokens_per_sample"] == 3 * 2 * 2
    assert result["forward_gflop_per_sample"] > 0 and re.fullmatch(r".+ CPU, \d+ cores, \d+ threads?", result["machine"])
    eager, compiled = result["rows"]
    assert (eager["mode"], compiled["mode"]) == ("eager", "compiled")
    assert all(r["samples_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in result["rows"])
    assert len(eager["losses"]) == 2 and compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["9x32x32_4", "training.yaml"]


@pytest.mark.parametrize("command, argv", [(report, ["--model", "no/such/folder"]), (report, ["--out", "report.txt"]),
                                           (backbones, ["--size", "7"]), (backbones, ["--compile"]),
                                           (training, ["--steps", "10"]), (training, ["--vae", "no.yaml"]),
                                           (sampling, ["--batch", "0"])])
def test_bad_input_is_one_line_and_exit_code_2(command, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not list(tmp_path.iterdir())  # nothing written
