"""The pipeline evaluation command on a small untrained pipeline: the files it writes, that its
numbers are the adherence judge's on the videos it made, and its bad-input errors."""

import json

import pytest
import torch

from dit_video.eval import evaluate
from pipeline_checks import write_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield write_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny")
    torch.set_num_threads(threads)


def test_every_attribute_combination_is_a_prompt():
    prompts = evaluate.all_prompts()
    assert len(prompts) == 180 and len({p["caption"] for p in prompts}) == 180
    assert prompts[0]["caption"] == "a blue circle moving down on a black background"


def test_spread_prompts_cover_every_attribute_value():
    prompts = evaluate.all_prompts()
    picked = evaluate.spread(prompts, 36)
    assert len(picked) == 36 and picked[0] == prompts[0] and len({p["caption"] for p in picked}) == 36
    for attribute in ("shape", "color", "direction", "background"):
        assert {p[attribute] for p in picked} == {p[attribute] for p in prompts}
    assert evaluate.spread(prompts, None) == evaluate.spread(prompts, 500) == prompts


@pytest.mark.parametrize("extension", [True, False])
def test_the_report_holds_adherence_extension_and_vae_figures(folder, tmp_path, extension):
    out = tmp_path / "eval"
    evaluate.main(["--model", str(folder), "--out", str(out), "--limit", "3", "--seeds", "2", "--batch", "4"]
                  + (["--extension-prompts", "2"] if extension else ["--no-extension"]))
    report = json.loads((out / "report.json").read_text())
    assert report["videos"] == 6 and report["prompts"] == 3 and report["size"] == "9x16x16"
    table = json.loads((out / "adherence.json").read_text())
    assert table["accuracy"] == report["adherence"]["accuracy"]
    assert table["clips"] == 6 and len(table["results"]) == 6  # one judged row per (prompt, seed)
    assert (report["extension"] is not None) == extension
    # the renderer's own clips for the same prompts and seeds, judged the same way
    assert report["rendered"]["clips"] == 6 and report["rendered"]["accuracy"]["color"] == 1.0
    assert report["rendered"]["consistency"]["on_path"] == 1.0
    if extension:
        ext = report["extension"]
        assert set(ext) == {"guided", "replacement", "cut", "guided_minus_replacement"}
        methods = [ext[m] for m in ("guided", "replacement", "cut")]
        assert all(fig["prompts"] == 2 and len(fig["boundary_jumps"]) == 2 for fig in methods)
        for fig in methods:
            lo, hi = fig["boundary_jump_interval"]
            assert fig["boundary_jump_mean"] == pytest.approx(sum(fig["boundary_jumps"]) / 2) and lo <= hi
            assert min(fig["boundary_jumps"]) <= lo and hi <= max(fig["boundary_jumps"])  # a bootstrap of 2 values
        assert ext["guided_minus_replacement"]["boundary_jump_mean"] == pytest.approx(
            ext["guided"]["boundary_jump_mean"] - ext["replacement"]["boundary_jump_mean"], abs=1e-6)
        assert "Guided minus replacement, prompt by prompt:" in (out / "report.md").read_text()
    assert len(report["vae"]) == 4 and all(row["psnr"] > 0 for row in report["vae"])
    assert (out / "report.md").read_text().startswith("# Evaluation of")
    assert (out / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "must be >= 1"),
    (["--out", "/proc/eval"], "/proc/eval: cannot write there"),  # found before sampling
])
def test_bad_input_is_one_line_exit_2(folder, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--model", str(folder), "--out", str(tmp_path / "eval"), *argv])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "eval").exists()
