"""train.py's argument handling and the checks it makes before any work (fast, no DeepSpeed run)."""

import re
from pathlib import Path

import pytest
import torch

from dit_video.config import ConfigError, load_config
from dit_video.training.config import DiffusionTrainConfig
from dit_video.training.stages import backbone_config, check_buckets
from train import launcher_arguments
from vae import VideoVAE

ROOT = Path(__file__).resolve().parents[1]


def test_the_deepspeed_launchers_local_rank_is_dropped():
    assert launcher_arguments(["a.yaml", "--local_rank=3", "x=1"]) == ["a.yaml", "x=1"]
    assert launcher_arguments(["--local_rank", "0", "a.yaml"]) == ["a.yaml"]


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE.from_config(ROOT / "configs/vae/tiny.yaml")  # 4x8x8, 4 latent channels


def config(*overrides: str) -> DiffusionTrainConfig:
    return load_config(DiffusionTrainConfig, ROOT / "configs/base/tiny.yaml", list(overrides))


def test_the_run_fills_in_and_checks_the_backbone_channels(vae):
    filled = backbone_config(config(), vae, 32)
    assert (filled["name"], filled["in_channels"], filled["text_dim"], filled["cond_channels"]) == ("dit", 4, 32, 0)
    ssr = config("stage=ssr", "cascade={spatial: 2}")
    assert backbone_config(ssr, vae, 32)["cond_channels"] == 4
    with pytest.raises(ConfigError, match="text_dim: this run needs 64, got 32"):
        backbone_config(config(), vae, 64)


@pytest.mark.parametrize("bucket, ok", [((9, 32, 48), True), ((17, 64, 32), True), ((8, 32, 32), False),
                                        ((9, 40, 32), False)])
def test_buckets_must_fit_the_vae_and_the_patch(vae, bucket, ok):
    frames, height, width = bucket
    cfg = config(f"data.buckets=[{{frames: {frames}, height: {height}, width: {width}, batch_size: 1}}]")
    if ok:
        check_buckets(cfg, vae, (1, 2, 2))
    else:
        with pytest.raises(ConfigError, match="does not fit"):
            check_buckets(cfg, vae, (1, 2, 2))


def test_cascade_stages_need_their_factor():
    with pytest.raises(ConfigError, match="cascade"):
        config("stage=tsr")
    with pytest.raises(ConfigError, match="cascade.temporal must be >= 2"):
        config("stage=tsr", "cascade={spatial: 2}")
    with pytest.raises(ConfigError, match="only for them"):
        config("cascade={spatial: 2}")
    cfg = config("stage=ssr", "cascade={spatial: 2}",
                 "data.buckets=[{frames: 9, height: 32, width: 48, batch_size: 1}]")
    with pytest.raises(ConfigError, match="spatial factor"):  # 48 is no multiple of 8 x 2 x 2
        check_buckets(cfg, VideoVAE.from_config(ROOT / "configs/vae/tiny.yaml"), (1, 2, 2))


def test_the_backbone_can_be_given_inline(vae):
    cfg = config("backbone={name: unet3d, channels: 16, channel_mult: [1, 2], attention_levels: [1], head_dim: 8}")
    assert backbone_config(cfg, vae, 32) == {"name": "unet3d", "channels": 16, "channel_mult": [1, 2],
                                             "attention_levels": [1], "head_dim": 8, "in_channels": 4,
                                             "text_dim": 32, "cond_channels": 0}


def test_the_deepspeed_config_joins_a_ready_zero_file_and_the_run_settings(tmp_path):
    from dit_video.training.engine import OptimConfig, deepspeed_config

    cpu = torch.device("cpu")
    ds = deepspeed_config(OptimConfig(zero=2, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.01, warmup_steps=10,
                                      lr_schedule="cosine", min_lr_ratio=0.2, grad_accum=4, grad_clip=0.5),
                          micro_batch=3, total_steps=100, device=cpu)
    assert ds["zero_optimization"]["stage"] == 2 and "overlap_comm" not in ds["zero_optimization"]  # CPU
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (3, 4, 0.5)
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.01, "torch_adam": True}
    assert ds["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 100, "warmup_num_steps": 10, "warmup_min_ratio": 0.0, "cos_min_ratio": 0.2,
        "warmup_type": "linear"}}
    assert not ds["bf16"]["enabled"] and not ds["checkpoint"]["load_universal"]
    assert "scheduler" not in deepspeed_config(OptimConfig(), 1, 10, cpu)  # constant lr, no warmup
    custom = tmp_path / "mine.json"
    custom.write_text('{"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}')
    assert deepspeed_config(OptimConfig(deepspeed=str(custom)), 1, 10, cpu)["zero_optimization"] == \
        {"stage": 1, "reduce_bucket_size": 1000}
    with pytest.raises(ValueError, match="bf16 needs a CUDA device"):
        deepspeed_config(OptimConfig(precision="bf16"), 1, 10, cpu)
    with pytest.raises(ValueError, match="cannot read"):
        deepspeed_config(OptimConfig(deepspeed=str(tmp_path / "none.json")), 1, 10, cpu)


def test_the_vae_stage_has_no_blocks_to_compile():
    from dit_video.training.config import VAETrainConfig

    load_config(VAETrainConfig, ROOT / "configs/vae/train_tiny.yaml", [])
    with pytest.raises(ConfigError, match="train.compile: compiles a backbone's blocks"):
        load_config(VAETrainConfig, ROOT / "configs/vae/train_tiny.yaml", ["train.compile=true"])


def test_a_resumed_run_keeps_what_its_checkpoint_depends_on(tmp_path):
    from dit_video.cli import UsageError
    from dit_video.config import save_config
    from dit_video.training.checkpoint import check_resumable

    save_config(config(f"out_dir={tmp_path}", "train.steps=10"), tmp_path / "config.yaml")
    state = {"step": 6}
    for allowed in ([], ["train.steps=20", "train.checkpoint_every=2", "optim.lr=0.0002", "data.num_workers=2"]):
        check_resumable(tmp_path, config(f"out_dir={tmp_path}", "train.steps=10", *allowed), state)
    for override, message in [("optim.zero=3", "optim.zero=2, now 3"), ("train.seed=5", "train.seed=0, now 5"),
                              ("backbone={name: dit, size: tiny}",
                               "backbone='configs/dit/dit_tiny.yaml', now {'name': 'dit', 'size': 'tiny'}"),
                              ("text.max_length=32", "text.max_length=48, now 32")]:
        with pytest.raises(UsageError, match=re.escape(f"the run started with {message}; a resumed run keeps")):
            check_resumable(tmp_path, config(f"out_dir={tmp_path}", "train.steps=10", override), state)
    with pytest.raises(UsageError, match="newest checkpoint is at step 6, past train.steps=4: raise train.steps"):
        check_resumable(tmp_path, config(f"out_dir={tmp_path}", "train.steps=4"), state)


def test_an_unusable_out_dir_or_t5_folder_is_a_one_line_error(tmp_path, vae):
    from dit_video.cli import UsageError
    from dit_video.training.stages import DiffusionStage, preflight

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UsageError, match="a_file: exists and is not a directory"):
        preflight(config(f"out_dir={tmp_path / 'a_file'}"))
    with pytest.raises(UsageError, match="cannot write there .*a_file is not a writable directory"):
        preflight(config(f"out_dir={tmp_path / 'a_file' / 'run'}"))
    with pytest.raises(UsageError, match="/proc/run: cannot write there"):
        preflight(config("out_dir=/proc/run"))  # before any step is taken
    preflight(config(f"out_dir={tmp_path / 'new' / 'run'}"))  # made when the run starts
    assert list(tmp_path.iterdir()) == [tmp_path / "a_file"]  # the writability probe left nothing

    vae.save_pretrained(tmp_path / "vae")
    cfg = config(f"out_dir={tmp_path / 'run'}", f"vae={tmp_path / 'vae'}", f"text={{encoder: t5, path: {tmp_path}}}")
    with pytest.raises(ConfigError, match=f"text.path: {tmp_path} holds no T5 checkpoint"):
        DiffusionStage(cfg, 0, 1, torch.device("cpu"), torch.Generator())


def test_a_failed_universal_conversion_says_how_to_convert_by_hand(tmp_path):
    """Resuming with another number of processes converts the DeepSpeed states first; states it
    cannot convert (here: none) end in one line with the converter's reason and its command."""
    from dit_video.training.checkpoint import ensure_universal

    step = tmp_path / "step_00000004"
    (step / "ds").mkdir(parents=True)
    with pytest.raises(RuntimeError, match=re.escape(f"converting to a universal checkpoint failed (")
                       + ".*" + re.escape(f"ds_to_universal --input_folder {step / 'ds'} --output_folder "
                                          f"{step / 'universal'}")):
        ensure_universal(step, 0)  # rank 0 converts before any barrier
    assert sorted(p.name for p in step.iterdir()) == ["ds"]
