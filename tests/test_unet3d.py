"""The VDM 3D U-Net behind the backbone interface."""

from pathlib import Path

import pytest
import torch

from backbone_checks import assert_checkpointing_is_exact, assert_trains_from_its_initialization

from dit_video.models import UNet3D, UNet3DConfig, build_backbone

ROOT = Path(__file__).resolve().parents[1]


def make(randomize=True, **kwargs) -> UNet3D:
    torch.manual_seed(0)
    cfg = dict(in_channels=4, text_dim=8, channels=16, channel_mult=[1, 2], blocks_per_level=1,
               attention_levels=[1], head_dim=16, norm_groups=8, attention_backend="math")
    model = UNet3D(UNet3DConfig(**{**cfg, **kwargs})).eval()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_shapes_and_zero_output_at_init_with_every_input():
    model = make(randomize=False, cond_channels=4, temporal_conv=True)
    z = torch.randn(2, 4, 3, 8, 12)
    out = model(z, torch.randn(2), text=torch.randn(2, 5, 8), text_mask=torch.tensor([[1, 1, 0, 0, 0]] * 2).bool(),
                cond=torch.randn(2, 4, 3, 8, 12), cond_logsnr=torch.randn(2), is_image=torch.tensor([True, False]))
    assert out.shape == z.shape and torch.equal(out, torch.zeros_like(out))
    assert model(z[:, :, :1], torch.zeros(2), cond=torch.randn(2, 4, 1, 8, 12), cond_logsnr=torch.zeros(2)).shape \
        == (2, 4, 1, 8, 12)


@pytest.mark.parametrize("temporal_conv", [False, True])
def test_images_in_a_video_batch_are_independent_frames(temporal_conv):
    """Frame by frame, what one-frame inputs give: as videos of one frame, and as images."""
    model = make(temporal_conv=temporal_conv)
    z, logsnr, text = torch.randn(1, 4, 4, 8, 8), torch.tensor([0.5]), torch.randn(1, 2, 8)
    flag = torch.tensor([True])
    with torch.no_grad():
        joint = model(z, logsnr, text=text, is_image=flag)
        for i in range(4):
            for is_image in (None, flag):
                single = model(z[:, :, i:i + 1], logsnr, text=text, is_image=is_image)
                torch.testing.assert_close(joint[:, :, i:i + 1], single, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(z, logsnr, text=text), joint, atol=1e-4)


def test_every_parameter_trains_from_the_real_initialization():
    assert_trains_from_its_initialization(make(randomize=False, cond_channels=4, temporal_conv=True),
                                          text=torch.randn(2, 3, 8), text_mask=torch.tensor([[True] * 3, [False] * 3]),
                                          cond=torch.randn(2, 4, 5, 8, 8),
                                          cond_logsnr=torch.randn(2))


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    assert_checkpointing_is_exact(lambda **kwargs: make(temporal_conv=True, **kwargs))


def test_compile_blocks_refuses_the_unet():
    from dit_video.models import compile_blocks

    with pytest.raises(ValueError, match="only the transformer backbones"):
        compile_blocks(make())


def test_registry_and_errors():
    model = build_backbone(ROOT / "configs/unet/unet3d_tiny.yaml")
    assert (model.in_channels, model.out_channels, model.cond_channels, model.text_dim) == (4, 4, 0, 32)
    with pytest.raises(ValueError, match="not divisible by 2"):
        make()(torch.randn(1, 4, 1, 7, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="attention_levels \\[3\\]"):
        UNet3DConfig(attention_levels=[3])


def test_out_channels_and_no_attention_levels():
    model = make(out_channels=8, attention_levels=[])
    with torch.no_grad():
        assert model(torch.randn(1, 4, 2, 8, 8), torch.zeros(1)).shape == (1, 8, 2, 8, 8)
