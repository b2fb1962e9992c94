"""train.py's argument handling and the checks it makes before any work (fast, no DeepSpeed run)."""

from pathlib import Path

import pytest
import torch

from dit_video.config import ConfigError, load_config
from dit_video.training.config import DiffusionTrainConfig
from train import backbone_config, check_buckets, launcher_arguments
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
