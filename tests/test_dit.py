"""The factorized space-time DiT: interface, adaLN-Zero init, image masking, native sizes."""

import math

import pytest
import torch

from dit_video.models.dit import DiT, SelfAttention
from backbone_checks import (assert_checkpointing_is_exact, assert_compiled_blocks_are_exact,
                             assert_trains_from_its_initialization, make_dit as make)


VARIANTS = [(name, spatial, temporal) for name in ("dit", "dit3d") for spatial in ("sincos", "rope")
            for temporal in ("rope", "t5_bias")]
TEXT = pytest.mark.parametrize("text_attention", ["cross", "joint"])


@TEXT
@pytest.mark.parametrize("name, spatial, temporal", VARIANTS)
def test_an_untrained_model_outputs_exactly_zero(name, spatial, temporal, text_attention):
    model = make(name, spatial, temporal, randomize=False, cond_channels=4, text_attention=text_attention)
    z = torch.randn(2, 4, 3, 8, 12)
    out = model(z, torch.randn(2), text=torch.randn(2, 5, 8), cond=torch.randn(2, 4, 3, 8, 12),
                cond_logsnr=torch.randn(2), is_image=torch.tensor([True, False]))
    assert out.shape == z.shape and torch.equal(out, torch.zeros_like(out))


@TEXT
@pytest.mark.parametrize("name, spatial, temporal", VARIANTS)
def test_images_in_a_video_batch_are_independent_frames(name, spatial, temporal, text_attention):
    model = make(name, spatial, temporal, text_attention=text_attention,
                 frame_positions="sincos" if spatial == "sincos" else "none")
    z, logsnr = torch.randn(1, 4, 4, 8, 8), torch.tensor([0.3])
    text = torch.randn(1, 3, 8)
    with torch.no_grad():
        joint = model(z, logsnr, text=text, is_image=torch.tensor([True]))
        for i in range(4):
            single = model(z[:, :, i:i + 1], logsnr, text=text)
            torch.testing.assert_close(joint[:, :, i:i + 1], single, rtol=1e-5, atol=1e-5)
        video = model(z, logsnr, text=text)
    assert not torch.allclose(video, joint, atol=1e-4)  # without is_image the frames do mix


@TEXT
@pytest.mark.parametrize("name, spatial, temporal", VARIANTS)
def test_every_parameter_trains_from_the_real_initialization(name, spatial, temporal, text_attention):
    model = make(name, spatial, temporal, randomize=False, cond_channels=4, text_attention=text_attention)
    assert_trains_from_its_initialization(model, text=torch.randn(2, 3, 8),
                                          text_mask=torch.tensor([[True] * 3, [False] * 3]),
                                          cond=torch.randn(2, 4, 5, 8, 8), cond_logsnr=torch.randn(2))


@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_one_model_runs_at_any_size_aspect_and_length(name):
    model = make(name)
    with torch.no_grad():
        for shape in [(1, 4, 1, 8, 8), (1, 4, 5, 8, 16), (1, 4, 9, 12, 6), (1, 4, 2, 32, 32)]:
            out = model(torch.randn(shape), torch.zeros(1))
            assert out.shape == shape and torch.isfinite(out).all()


@TEXT
@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_text_mask_hides_padding_tokens(name, text_attention):
    model = make(name, text_attention=text_attention)
    z, logsnr = torch.randn(1, 4, 2, 8, 8), torch.zeros(1)
    text = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    changed = text.clone()
    changed[:, 2:] = torch.randn(1, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(z, logsnr, text=text, text_mask=mask),
                                   model(z, logsnr, text=changed, text_mask=mask))
        assert not torch.allclose(model(z, logsnr, text=text), model(z, logsnr, text=changed))
        assert model(z, logsnr).shape == z.shape  # no text: the learned null embedding


@TEXT
@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_an_all_false_text_mask_means_the_null_text(name, text_attention):
    """Caption dropout in training masks a sample's whole caption; that sample must see exactly
    what sampling without text (the unconditional branch of guidance) sees."""
    model = make(name, text_attention=text_attention)
    z, logsnr = torch.randn(2, 4, 2, 8, 8), torch.tensor([0.0, 1.0])
    text, mask = torch.randn(2, 4, 8), torch.tensor([[True, True, True, False], [False] * 4])
    with torch.no_grad():
        out = model(z, logsnr, text=text, text_mask=mask)
        torch.testing.assert_close(out[1:], model(z[1:], logsnr[1:]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[:1], model(z[:1], logsnr[:1], text=text[:1], text_mask=mask[:1]))
        assert torch.isfinite(out).all()


def test_cascade_conditioning_enters_the_output():
    model = make(cond_channels=4)
    z, logsnr = torch.randn(1, 4, 2, 8, 8), torch.zeros(1)
    cond = torch.randn(1, 4, 2, 8, 8)
    with torch.no_grad():
        a = model(z, logsnr, cond=cond, cond_logsnr=torch.tensor([1.0]))
        b = model(z, logsnr, cond=cond, cond_logsnr=torch.tensor([5.0]))
        c = model(z, logsnr, cond=cond + 1, cond_logsnr=torch.tensor([1.0]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="takes cond with 4 channels"):
        model(z, logsnr)
    with pytest.raises(ValueError, match="cond_logsnr"):
        model(z, logsnr, cond=cond)


@TEXT
@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(name, text_attention):
    assert_checkpointing_is_exact(lambda **kwargs: make(name, text_attention=text_attention, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("name, temporal, text_attention, shapes", [
    ("dit", "t5_bias", "cross", [(2, 4, 3, 8, 8), (2, 4, 5, 8, 12)]), ("dit3d", "rope", "joint", [(2, 4, 3, 8, 8)])])
def test_compiled_blocks_give_the_same_outputs_and_gradients(name, temporal, text_attention, shapes):
    assert_compiled_blocks_are_exact(lambda: make(name, spatial="rope", temporal=temporal, text_attention=text_attention,
                                                  attention_backend="auto"), blocks=2, shapes=shapes)


def test_latent_sizes_must_fit_the_patch():
    with pytest.raises(ValueError, match="not divisible by the patch 1x2x2"):
        make()(torch.randn(1, 4, 2, 7, 8), torch.zeros(1))


@pytest.mark.parametrize("path", ["configs/dit/dit_tiny.yaml", "configs/dit/dit3d_tiny.yaml"])
def test_build_backbone_from_the_tiny_configs(path):
    from pathlib import Path

    from dit_video.models import build_backbone

    root = Path(__file__).resolve().parents[1]
    model = build_backbone(root / path)
    assert (model.in_channels, model.out_channels, model.cond_channels, model.text_dim) == (4, 4, 0, 32)
    assert model.config.name == path.split("/")[-1].split("_")[0]
    assert build_backbone({"name": "dit", "size": "tiny"}).config.width == 64


def test_build_backbone_refuses_unknown_names_and_keys():
    from dit_video.config import ConfigError
    from dit_video.models import build_backbone

    with pytest.raises(ConfigError, match="name: expected one of 'dit', 'dit3d', 'unet3d', got 'unet'"):
        build_backbone({"name": "unet"})
    with pytest.raises(ConfigError, match="hidden: unknown key"):
        build_backbone({"name": "dit", "hidden": 3})


def test_head_channels_must_fit_the_rotary_split():
    from dit_video.config import ConfigError
    from dit_video.models import build_backbone

    both = {"name": "dit3d", "width": 48, "heads": 4, "depth": 1, "spatial_positions": "rope"}  # heads of 12
    with pytest.raises(ConfigError, match="heads of a multiple of 8 channels"):
        build_backbone(both)
    for fits in ({**both, "heads": 2}, {**both, "temporal_positions": "t5_bias"}, {**both, "name": "dit"}):
        model = build_backbone(fits)
        assert model(torch.randn(1, 4, 2, 4, 4), torch.zeros(1)).shape == (1, 4, 2, 4, 4)


@TEXT
@pytest.mark.parametrize("name, spatial, temporal", VARIANTS)
def test_only_frame_differences_matter(name, spatial, temporal, text_attention):
    # Run the blocks with every frame position moved by 1000: with relative temporal positions
    # (RoPE or the T5 bias) and no absolute time embedding, nothing may change. Except where the
    # text joins dit3d's attention with RoPE in time: the text keys carry no rotation, so the
    # attention to them sees each frame's index (documented, as in CogVideoX).
    model = make(name, spatial, temporal, text_attention=text_attention)
    x = torch.randn(2, 5, 16, 64)  # [B, T, N, W] tokens
    c, text = torch.randn(2, 64), torch.randn(2, 3, 64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    outputs = []
    with torch.no_grad():
        for first in (0, 1000):
            positions = model._positions(5, 4, 4, x, first_frame=first)
            positions["text_bias"] = model.text_bias(mask, torch.tensor([16 if name == "dit" else 80] * 2))
            h = x
            for block in model.blocks:
                h = block(h, c, positions, text, mask)
            outputs.append(h)
    if name == "dit3d" and temporal == "rope" and text_attention == "joint":
        assert (outputs[0] - outputs[1]).abs().max() > 1e-2
    else:
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_only_absolute_positions_let_the_output_vary_over_a_uniform_input(name):
    """Relative positions (RoPE, the T5 bias) see only differences: on a clip whose tokens are all
    equal, every token attends to equal values, so every output frame and patch is the same. Only
    the edges of the frame and clip can then tell a model where and when an object is. Sin-cos
    positions in space, and frame positions in time, make the output vary over the frame and over
    the clip. (Patch 1: a patch's own pixels come out different anyway.)"""
    z = torch.ones(1, 4, 3, 4, 4) * torch.randn(1, 4, 1, 1, 1)  # one latent vector everywhere
    text, logsnr = torch.randn(1, 3, 8), torch.tensor([-8.0])

    def spread(out):  # (over frames, over pixels) of the output
        return (out - out.mean(2, keepdim=True)).abs().max().item(), \
               (out - out.mean((3, 4), keepdim=True)).abs().max().item()

    with torch.no_grad():
        relative = spread(make(name, "rope", "rope", patch=(1, 1, 1))(z, logsnr, text=text))
        spatial = spread(make(name, "sincos", "rope", patch=(1, 1, 1))(z, logsnr, text=text))
        both = spread(make(name, "sincos", "rope", patch=(1, 1, 1), frame_positions="sincos")(z, logsnr, text=text))
    assert relative[0] < 1e-5 and relative[1] < 1e-5
    # (in dit3d, keys that differ in space let a token's frame show faintly: the offsets to the
    # clip's ends differ from frame to frame)
    assert spatial[0] < 1e-3 < 1e-2 < spatial[1]
    assert both[0] > 1e-2 and both[1] > 1e-2


def test_out_channels_can_differ_from_in_channels():
    # e.g. a model that also predicts a variance: 2x the latent channels out
    model = make(out_channels=8)
    with torch.no_grad():
        assert model(torch.randn(1, 4, 2, 8, 8), torch.zeros(1)).shape == (1, 8, 2, 8, 8)


def test_rotary_self_attention_and_its_gradients_match_the_written_out_rotation():
    """Self-attention with RoPE against the rotation written with real cos / sin of each channel
    pair: outputs and the gradients of the input and every weight (the backward runs through the
    split of q, k and v, which the outputs alone would not check). float64 throughout, except the
    rotation itself, which apply_rope computes in float32: hence the tolerance."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, "math").double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(5, 4, dtype=torch.float64)  # [L, head_dim / 2]
    rotations = torch.stack([angles.cos(), angles.sin()], dim=-1)

    def rotate(a):  # a [B, H, L, D]: pair (a0, a1) -> (a0 cos - a1 sin, a0 sin + a1 cos)
        a0, a1 = a.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = angles.cos(), angles.sin()
        return torch.stack([a0 * cos - a1 * sin, a0 * sin + a1 * cos], dim=-1).flatten(-2)

    def written_out(x):
        q, k, v = attn.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / 8 ** 0.5
        return attn.out((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))

    grads = []
    for forward in (lambda x: attn(x, rope=rotations), written_out):
        out = forward(x)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                         [x, *attn.parameters()]))
        grads[-1] = (out.detach(), *grads[-1])
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 3])
def test_joint_text_attention_is_softmax_over_the_tokens_and_the_unmasked_text(groups):
    """`text_attention: joint` written out: every token's query against its own group's keys (with
    the position bias) and its sample's text keys (with the text bias), padded text tokens left
    out. Groups: the frames of the factorized spatial attention, which share their sample's text."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 2, "sdpa", text=True)
    b, n, l_text = 2, 5, 4
    x, text = torch.randn(b * groups, n, 16), torch.randn(b, l_text, 16)
    text_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    text_bias = DiT.text_bias(text_mask, torch.tensor([n, n]))
    bias = torch.randn(1, 2, n, n)
    with torch.no_grad():
        out = attn(x, bias=bias, text=text, text_bias=text_bias)
        q, k, v = attn.qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        text_k, text_v = attn.text_kv(text).unflatten(-1, (2, 2, 8)).permute(2, 0, 3, 1, 4)
        for i in range(b * groups):
            sample = i // groups
            keep = text_mask[sample]
            keys = torch.cat([k[i], text_k[sample][:, keep]], dim=1)
            values = torch.cat([v[i], text_v[sample][:, keep]], dim=1)
            scores = q[i] @ keys.transpose(-1, -2) / 8 ** 0.5
            scores[:, :, :n] += bias[0]
            scores[:, :, n:] += math.log(n / keep.sum())
            expected = attn.out((scores.softmax(-1) @ values).transpose(0, 1).flatten(1))
            torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dit", "dit3d"])
def test_joint_text_gets_half_the_attention_at_equal_logits(name):
    """With every query zero (equal logits), a token's attention output is half the mean of the
    values of the video keys it sees and half the mean of its caption's unmasked ones, whatever
    their numbers: dit's spatial attention sees a frame, dit3d's the clip, an image's its frame."""
    torch.manual_seed(0)
    model = make(name, text_attention="joint")
    attn = model.blocks[0].spatial if name == "dit" else model.blocks[0].attn
    width = attn.out.in_features
    with torch.no_grad():
        attn.qkv.weight[:width] = 0  # q = 0
        attn.qkv.bias[:width] = 0
    inputs = {}

    def grab(module, args, kwargs, output):
        inputs.update(x=args[0], **kwargs)

    hook = attn.register_forward_hook(grab, with_kwargs=True)
    b, t, n = 2, 3, 16  # latents 3x8x8, patch 1x2x2: 16 patches a frame
    text, text_mask = torch.randn(b, 4, 8), torch.tensor([[True, True, True, False], [True, False, False, False]])
    with torch.no_grad():
        model(torch.randn(b, 4, t, 8, 8), torch.zeros(b), text=text, text_mask=text_mask,
              is_image=torch.tensor([False, True]))
        hook.remove()
        x, text_tokens, out = inputs["x"], inputs["text"], attn(**inputs)
        v = attn.qkv(x)[..., 2 * width:]
        text_v = attn.text_kv(text_tokens)[..., width:]
        for row in range(x.shape[0]):
            sample = row // t if name == "dit" else row
            if name == "dit" or not sample:  # a frame, or the whole clip
                seen = v[row]
            else:  # an image sample in dit3d: each token its own frame (check the first)
                seen = v[row, :n]
            expected = attn.out(0.5 * seen.mean(0) + 0.5 * text_v[sample, text_mask[sample]].mean(0))
            torch.testing.assert_close(out[row, 0], expected, rtol=1e-5, atol=1e-5)


def test_joint_text_attention_replaces_the_cross_attention():
    cross, joint = (make("dit3d", text_attention=kind) for kind in ("cross", "joint"))
    assert joint.blocks[0].cross is None and joint.blocks[0].attn.text_kv is not None
    assert cross.blocks[0].cross is not None and cross.blocks[0].attn.text_kv is None
    # the text's own key/value projection stays; the query, output projections and LayerNorm go
    saved = sum(p.numel() for m in (cross.blocks[0].cross.q, cross.blocks[0].cross.out, cross.blocks[0].norm_c)
                for p in m.parameters())
    per_block = sum(p.numel() for p in cross.parameters()) - sum(p.numel() for p in joint.parameters())
    assert per_block == saved * len(cross.blocks)
    z, text = torch.randn(1, 4, 2, 8, 8), torch.randn(1, 3, 8)
    with torch.no_grad():  # the text reaches the output through the attention alone
        assert not torch.allclose(joint(z, torch.zeros(1), text=text), joint(z, torch.zeros(1), text=text + 1))
