"""The causal video VAE: frame-count contract, causality, chunking, tiling, files."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dit_video.config import ConfigError
from vae import VAEConfig, VideoVAE
from vae.model import _tiled

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/vae/tiny.yaml"


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = VideoVAE.from_config(TINY).eval()
    # Random GroupNorm affine parameters and latent statistics, so that nothing is trivially 0 or 1.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        model.latent_shift.normal_()
        model.latent_scale.uniform_(0.5, 2.0)
    return model


def video(t=9, h=32, w=48, b=2, seed=0):
    return torch.rand(b, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("tf, sf, channels", [(1, 8, [8, 16, 16, 16]), (4, 8, [8, 16, 16, 16]),
                                               (4, 4, [8, 16, 16]), (2, 8, [8, 16, 16, 16])])
def test_configured_compressions_give_the_stated_shapes(tf, sf, channels):
    model = VideoVAE(VAEConfig(channels=channels, spatial_factor=sf, temporal_factor=tf, blocks_per_level=1,
                               norm_groups=8, latent_channels=6, attention=tf == 4)).eval()
    frames = 1 + 2 * tf
    x = video(t=frames, h=2 * sf, w=3 * sf)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (2, 6, 3, 2, 3) == model.latent_shape(x.shape)
        assert model.decode(z).shape == x.shape
    assert (model.temporal_factor, model.spatial_factor, model.latent_channels) == (tf, sf, 6)


@torch.no_grad()
def test_latents_depend_only_on_past_frames(vae):
    x = video(t=13)
    z = vae.encode(x)
    for j in (1, 4, 5, 8, 12):
        changed = x.clone()
        changed[:, :, j:] = torch.rand_like(changed[:, :, j:])
        z2 = vae.encode(changed)
        # latent frame i sees pixel frames up to f * i: those with f * i < j must be bit-identical
        for i in range(z.shape[2]):
            if 4 * i < j:
                assert torch.equal(z[:, :, i], z2[:, :, i]), (j, i)
            else:
                assert not torch.equal(z[:, :, i], z2[:, :, i]), (j, i)


@torch.no_grad()
def test_decoded_frames_depend_only_on_past_latents(vae):
    z = vae.encode(video(t=13))
    out = vae.decode(z)
    changed = z.clone()
    changed[:, :, 2:] += 1.0
    out2 = vae.decode(changed)
    assert torch.equal(out[:, :, :5], out2[:, :, :5])  # pixel frames 0..4 come from latent frames 0 and 1
    assert not torch.equal(out[:, :, 5:], out2[:, :, 5:])


@torch.no_grad()
def test_an_image_is_a_one_frame_video(vae):
    x = video(t=9)
    image = x[:, :, 0]
    z_image = vae.encode(image)
    assert z_image.shape == (2, 4, 4, 6)
    assert torch.equal(z_image, vae.encode(image[:, :, None])[:, :, 0])
    assert torch.equal(vae.decode(z_image), vae.decode(z_image[:, :, None])[:, :, 0])
    # and the first latent frame of a video is that image's latent (causality), up to float rounding
    torch.testing.assert_close(vae.encode(x)[:, :, 0], z_image, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("chunk", [4, 8])
def test_chunked_encode_and_decode_equal_one_pass(vae, chunk):
    x = video(t=17)
    z = vae.encode(x)
    torch.testing.assert_close(vae.encode(x, chunk_frames=chunk), z, rtol=0, atol=1e-5)
    out = vae.decode(z)
    for chunk_latents in (1, chunk // 4):
        torch.testing.assert_close(vae.decode(z, chunk_latents=chunk_latents), out, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(x, chunk_frames=6)


def test_tiles_are_placed_and_blended_exactly_for_a_local_map():
    x = torch.randn(1, 2, 3, 40, 56)
    down = lambda v: F.avg_pool3d(v, (1, 8, 8))  # noqa: E731
    torch.testing.assert_close(_tiled(down, x, tile=16, overlap=8, multiple=8, scale=1 / 8), down(x))
    up = lambda v: v.repeat_interleave(4, -1).repeat_interleave(4, -2)  # noqa: E731
    torch.testing.assert_close(_tiled(up, x, tile=12, overlap=4, multiple=1, scale=4), up(x))


@torch.no_grad()
def test_tiling_larger_than_the_frame_is_the_one_pass(vae):
    x = video(t=5)
    assert torch.equal(vae.encode(x, tile=64), vae.encode(x))
    z = vae.encode(x, tile=32, tile_overlap=16, chunk_frames=4)
    assert z.shape == vae.encode(x).shape and torch.isfinite(z).all()
    assert vae.decode(z, tile=4, tile_overlap=2).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(x, tile=20)


@torch.no_grad()
def test_sampling_the_posterior(vae):
    x = video(t=5)
    mean = vae.encode(x)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, mean)


@torch.no_grad()
def test_latent_statistics_normalize_the_data(vae):
    model = VideoVAE.from_config(TINY).eval()
    data = [video(t=5, seed=s) for s in range(3)]
    model.fit_latent_stats(data)
    z = torch.cat([model.encode(v) for v in data]).transpose(0, 1).flatten(1)
    torch.testing.assert_close(z.mean(1), torch.zeros(4), rtol=0, atol=1e-4)
    torch.testing.assert_close(z.std(1, correction=0), torch.ones(4), rtol=0, atol=1e-4)
    # decode inverts the normalization: decode(encode) == decoder(posterior mean)
    mean, _ = model.posterior(data[0])
    torch.testing.assert_close(model.decode(model.encode(data[0])), model.decoder(mean), rtol=0, atol=1e-5)


@torch.no_grad()
def test_save_and_load_round_trip_exactly(vae, tmp_path):
    vae.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = VideoVAE.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == vae.config
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    x = video(t=5)
    assert torch.equal(loaded.encode(x), vae.encode(x))


def test_broken_model_directories_are_clear_errors(vae, tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        VideoVAE.from_pretrained(tmp_path)
    vae.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="unreadable weights"):
        VideoVAE.from_pretrained(tmp_path / "m")
    other = VideoVAE(VAEConfig(channels=[8, 16, 16, 16], blocks_per_level=1, norm_groups=8))
    other.save_pretrained(tmp_path / "o")
    (tmp_path / "o" / "config.yaml").write_text((tmp_path / "m" / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="do not match config.yaml"):
        VideoVAE.from_pretrained(tmp_path / "o")


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 8, 32, 32), r"8 frames: with temporal factor 4 a video needs 1 \+ 4\*k frames \(1, 5, 9, 13, ...\)"),
    ((1, 4, 5, 32, 32), "expected 3 channels, got 4"),
    ((1, 3, 5, 30, 32), "frame size 30x32 is not divisible by the spatial factor 8"),
    ((3, 5, 32), "expected a video"),
    ((2, 5, 32, 32), "expected 3 channels, got 5"),  # an image [B, C, H, W] with the wrong channels
])
def test_bad_videos_are_refused_with_a_clear_message(vae, shape, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_nan_input_is_refused(vae):
    x = video(t=5)
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vae.encode(x)


def test_bad_vae_configs_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        VAEConfig(spatial_factor=6)
    with pytest.raises(ValueError, match="needs at least 4 levels"):
        VAEConfig(channels=[8, 16])
