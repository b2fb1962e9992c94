"""The trained pipeline in checkpoints/tiny: it fits the repository, `sample.py` runs it out of the
box into a real mp4, its videos show the color, shape, background and direction of motion the
prompts name (judged by the analytic detector on the decoded frames), and extension joins its
chunks with no cut. Few prompts at few steps: the full evaluation is in checkpoints/tiny/README.md."""

from pathlib import Path

import pytest
import torch

from dit_video.data import read_video
from dit_video.eval.adherence import detect, detect_batch, parse_caption
from dit_video.pipeline import Pipeline, boundary_jump
from dit_video.diffusion import SamplerConfig

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("shape", "color", "direction", "background")
MISSES = 2  # of the 24 judgements below; a pipeline that ignored its prompts would miss about 17
# A pipeline that ignored the direction word would move each of these 6 videos the asked way with
# probability 1/4: it would pass with at most one miss in 200 tries.
DIRECTION_MISSES = 1
CUT_MARGIN = 0.7  # an extension's seam must jump less than this share of a cut's
SHIPPED = ROOT / "checkpoints/tiny"
# one prompt per color, each shape, direction and background at least once
PROMPTS = ["a red circle moving right on a gray background",
           "a green square moving up on a black background",
           "a blue triangle moving left on a black background",
           "a yellow circle moving down on a dark blue background",
           "a white square moving right on a dark blue background",
           "a red triangle moving up on a gray background"]


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is faster, and fair to a busy machine
    yield Pipeline.from_pretrained(SHIPPED)
    torch.set_num_threads(threads)


def test_the_shipped_pipeline_fits_the_repository():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert {p.relative_to(SHIPPED).parts[0] for p in files} >= {"vae", "base", "tsr", "pipeline.yaml", "README.md"}
    assert sum(p.stat().st_size for p in files) <= 50 * 2**20


def test_sample_py_writes_a_video_of_the_prompt_out_of_the_box(pipe, tmp_path):
    import sample

    out = tmp_path / "red.mp4"
    sample.main(["--prompt", PROMPTS[0], "--out", str(out), "--steps", "10"])  # the default model: the shipped one
    video = read_video(out)  # through decord, as any reader would
    assert video.shape == (3, pipe.frames, pipe.height, pipe.width)
    found, named = detect(video).attributes, parse_caption(PROMPTS[0])
    assert [found[k] for k in ATTRIBUTES] == [named[k] for k in ATTRIBUTES]


def test_videos_show_the_shape_color_background_and_motion_named(pipe):
    videos = pipe.generate(PROMPTS, seed=0, sampler=SamplerConfig(sampler="ddim", steps=10), progress=False)
    wrong = [(prompt, attribute, found.attributes[attribute])
             for prompt, found in zip(PROMPTS, detect_batch(videos))
             for attribute, named in parse_caption(prompt).items()
             if found.attributes[attribute] != named]
    assert len(wrong) <= MISSES, wrong
    assert sum(attribute == "direction" for _, attribute, _ in wrong) <= DIRECTION_MISSES, wrong


def test_extension_joins_chunks_with_no_cut(pipe):
    """Both methods continue the video: their boundary jump stays well below that of a cut into an
    unrelated video of the same prompts. (Guided against replacement: the model card's figures.)"""
    sampler = SamplerConfig(sampler="ddim", steps=10)
    prompts = PROMPTS[:3]
    first = pipe.generate(prompts, seed=0, sampler=sampler, progress=False)
    other = pipe.generate(prompts, seed=len(prompts), sampler=sampler, progress=False)[:, :, pipe.context_frames():]
    jumps = {"cut": boundary_jump(first, other).mean().item()}
    for method in ("guided", "replacement"):
        head, new = pipe.extend(prompts, 1, seed=0, method=method, sampler=sampler, progress=False)
        torch.testing.assert_close(head, first)  # the same first chunk
        jumps[method] = boundary_jump(head, new).mean().item()
    assert max(jumps["guided"], jumps["replacement"]) < CUT_MARGIN * jumps["cut"], jumps
