import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_video.models import DiT, DiTConfig, UNet3D, UNet3DConfig
from dit_video.models.flops import count_flops, count_parameters


@pytest.mark.parametrize("name", ["dit", "dit3d"])
@pytest.mark.parametrize("text_dim, cond_channels, text_attention, text_pool", [
    (0, 0, "cross", "mlp"), (16, 4, "cross", "mlp"), (16, 0, "joint", "mlp"), (16, 0, "cross", "linear")])
def test_analytic_flops_match_the_measured_count(name, text_dim, cond_channels, text_attention, text_pool):
    model = DiT(DiTConfig(name=name, size="tiny", text_dim=text_dim, cond_channels=cond_channels,
                          attention_backend="math", temporal_positions="t5_bias", text_attention=text_attention,
                          text_pool=text_pool))
    shape = (2, 4, 5, 16, 12)
    kwargs = {}
    if text_dim:
        kwargs.update(text=torch.randn(2, 7, text_dim))
    if cond_channels:
        kwargs.update(cond=torch.randn(2, cond_channels, 5, 16, 12), cond_logsnr=torch.zeros(2))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(shape), torch.zeros(2), **kwargs)
    measured = counter.get_total_flops()
    analytic = count_flops(model, shape, text_len=7 if text_dim else 0)
    assert analytic == pytest.approx(measured, rel=0.05), (analytic, measured)


def test_joint_attention_costs_more_as_frames_grow():
    fact, joint = (DiT(DiTConfig(name=n, size="tiny")) for n in ("dit", "dit3d"))
    ratio = [count_flops(joint, (1, 4, t, 32, 32)) / count_flops(fact, (1, 4, t, 32, 32)) for t in (4, 16, 64)]
    assert ratio[0] < ratio[1] < ratio[2]
    assert count_parameters(fact) > count_parameters(joint)  # the extra temporal attention layers


@pytest.mark.parametrize("temporal_conv, text_pool", [(False, "mlp"), (True, "mlp"), (False, "linear")])
def test_unet_flops_match_the_measured_count(temporal_conv, text_pool):
    model = UNet3D(UNet3DConfig(in_channels=4, text_dim=8, cond_channels=4, channels=16, channel_mult=[1, 2, 2],
                                blocks_per_level=2, attention_levels=[1, 2], head_dim=16, norm_groups=8,
                                attention_backend="math", temporal_conv=temporal_conv, text_pool=text_pool))
    shape = (2, 4, 3, 16, 12)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randn(shape), torch.zeros(2), text=torch.randn(2, 5, 8), cond=torch.randn(shape),
              cond_logsnr=torch.zeros(2))
    assert count_flops(model, shape, text_len=5) == pytest.approx(counter.get_total_flops(), rel=0.05)
