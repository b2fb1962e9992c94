"""The caption probe: its changed captions, its figures on a denoiser whose use of the caption is
known exactly, and the command on a small untrained base model and a real latent cache."""

import json

import pytest
import torch

from dit_video.data.latent_cache import Shape, cache_latents
from dit_video.data.synthetic import COLORS, generate
from dit_video.diffusion import diffuse
from dit_video.eval import parse_caption
from dit_video.eval.adherence import ATTRIBUTES
from dit_video.data.synthetic import caption as make_caption
from dit_video.eval.caption_probe import attribute_identification, caption_reliance, changed_captions, main
from pipeline_checks import write_pipeline

CAPTIONS = ["a red circle moving right on a gray background", "a white triangle moving down on a dark blue background"]


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_a_changed_caption_differs_in_that_attribute_only(attribute):
    for before, after in zip(CAPTIONS, changed_captions(CAPTIONS, attribute)):
        a, b = parse_caption(before), parse_caption(after)
        assert a[attribute] != b[attribute]
        assert {k: v for k, v in a.items() if k != attribute} == {k: v for k, v in b.items() if k != attribute}
    # the last value wraps around to the first
    assert parse_caption(changed_captions(CAPTIONS[1:], "color")[0])["color"] == "red"


def test_reliance_on_a_denoiser_that_reads_only_the_color():
    """x is a constant latent per color; the denoiser answers that latent for the color its caption
    names, plus a known share of z. The true error is that share's; only a changed color moves it."""
    palette = {name: torch.full((2, 3, 4, 4), float(i) - 2.0) for i, name in enumerate(COLORS)}
    captions = CAPTIONS * 3
    latents = torch.stack([palette[parse_caption(c)["color"]] for c in captions])

    def denoise(z, logsnr, texts):
        guess = torch.stack([palette[parse_caption(t)["color"]] for t in texts]) if texts else torch.zeros_like(z)
        return guess + 0.1 * z

    rows = caption_reliance(denoise, latents, captions, [-2.0, 3.0], torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    for row in rows:
        z = diffuse(latents, torch.full((len(latents),), row["logsnr"]), torch.randn(latents.shape, generator=generator))
        assert row["mse"]["true"] == pytest.approx((0.1 * z).square().mean().item(), rel=1e-6)
        assert row["increase"]["shape"] == row["increase"]["direction"] == row["increase"]["background"] == 0.0
        assert row["increase"]["color"] > 1.0
        assert row["mse"]["null"] == pytest.approx((0.1 * z - latents).square().mean().item(), rel=1e-6)
    # as a classifier it names every clip's color, and no other attribute: their values all tie
    for row in attribute_identification(denoise, latents, captions, [-2.0, 3.0], torch.Generator().manual_seed(0)):
        assert row["accuracy"] == {"shape": 0.0, "color": 1.0, "direction": 0.0, "background": 0.0}


def test_identification_counts_the_clips_whose_own_value_denoises_best():
    """A denoiser that answers each direction word's own latent, except that for the last clips
    their true word gives a far-off one: exactly the first clips are identified."""
    captions = [make_caption("circle", "red", d, "gray") for d in ("right", "left", "up", "down")] * 2
    targets = {d: torch.full((1, 2, 2, 2), float(i)) for i, d in enumerate(("right", "left", "up", "down"))}
    latents = torch.stack([targets[parse_caption(c)["direction"]] for c in captions])
    readable = 3  # the first three clips' own direction gives their latent; the rest are misread

    def denoise(z, logsnr, texts):
        out = []
        for i, text in enumerate(texts):
            d = parse_caption(text)["direction"]
            own = d == parse_caption(captions[i])["direction"]
            out.append(targets[d] + (10.0 if own and i >= readable else 0.0))
        return torch.stack(out)

    rows = attribute_identification(denoise, latents, captions, [0.0], torch.Generator().manual_seed(0))
    assert rows[0]["accuracy"]["direction"] == readable / len(captions)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    write_pipeline(root / "pipeline", stages=("base", "tsr"))
    manifest = generate(root / "clips", "train", 6, frames=5, size=8, progress=False)
    cache_latents(manifest, root / "pipeline/vae", [Shape(5, 8, 8)], root / "cache", progress=False)
    yield root
    torch.set_num_threads(threads)


def test_the_command_prints_and_writes_the_table(setup, tmp_path, capsys):
    out = tmp_path / "probe.json"
    main(["--model", str(setup / "pipeline/base"), "--latents", str(setup / "cache"), "--clips", "4",
          "--logsnr", "-1", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| log-SNR | MSE, true caption | wrong shape |" in printed and "| log-SNR | shape | color |" in printed
    figures = json.loads(out.read_text())
    assert figures["clips"] == 4 and [row["logsnr"] for row in figures["rows"]] == [-1.0, 1.0]
    assert all(row["mse"]["true"] > 0 and set(row["increase"]) == set(ATTRIBUTES) for row in figures["rows"])
    assert [set(row["accuracy"]) for row in figures["identification"]] == [set(ATTRIBUTES)] * 2
    # this folder's raw weights equal its EMA weights (write_pipeline saves them so): same figures;
    # another noise seed: other figures
    runs = {}
    for weights, seed in (("model", "0"), ("ema", "1")):
        main(["--model", str(setup / "pipeline/base"), "--latents", str(setup / "cache"), "--clips", "4",
              "--logsnr", "-1", "1", "--weights", weights, "--seed", seed, "--json", str(tmp_path / "again.json")])
        runs[weights] = json.loads((tmp_path / "again.json").read_text())["rows"]
    assert runs["model"] == figures["rows"] and runs["ema"] != figures["rows"]


@pytest.mark.parametrize("args, message", [
    (["--model", "{root}/pipeline/tsr"], "takes a base model; this one is a tsr stage"),
    (["--model", "{root}/missing"], "no such model directory"),
    (["--model", "{root}/pipeline/base", "--clips", "0"], "--clips must be >= 1"),
    (["--model", "{root}/pipeline/base", "--latents", "{root}/clips"], "not a latent cache"),
])
def test_bad_input_is_one_line_and_exit_2(setup, capsys, args, message):
    argv = ["--latents", str(setup / "cache")] + [a.format(root=setup) for a in args]
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1
