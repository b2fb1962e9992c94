"""The shared command-line checks: an output place is tested by writing to it, before any work."""

import errno
import os
from pathlib import Path

import pytest
import torch

from dit_video.cli import UsageError, check_output_dir, check_output_path, exits_cleanly, parse_device


def test_a_writable_place_passes_and_the_probe_leaves_nothing(tmp_path):
    check_output_path(tmp_path / "clip.mp4")
    check_output_dir(tmp_path / "run" / "nested")  # made later by the run; its existing parent is probed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs a /proc file system")
def test_a_folder_that_refuses_files_is_caught_even_when_its_mode_says_writable(monkeypatch):
    # root sees /proc as writable by its permission bits, yet no file can be created there
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: True)
    with pytest.raises(UsageError, match=r"/proc/x.mp4: cannot write there \(/proc refuses new files"):
        check_output_path("/proc/x.mp4")
    with pytest.raises(UsageError, match="/proc/run: cannot write there"):
        check_output_dir("/proc/run")


def test_an_os_error_at_the_entry_point_is_one_line_and_exit_2(capsys):
    @exits_cleanly
    def main(argv=None):
        raise OSError(errno.ENOSPC, "No space left on device", "out/clip.mp4")

    with pytest.raises(SystemExit) as exit:
        main([])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert err == "error: [Errno 28] No space left on device: 'out/clip.mp4'\n"


@pytest.mark.parametrize("spec, message", [
    ("gpu", "--device gpu: not a torch device (cpu, cuda, cuda:1, ...)"),
    ("meta", "--device meta: the project runs on cpu or cuda"),
    (f"cuda:{torch.cuda.device_count()}", f"--device cuda:{torch.cuda.device_count()}: no such CUDA device here"),
])
def test_one_device_check_for_every_entry_point(spec, message):
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError) as error:
        parse_device(spec)
    assert str(error.value) == message
