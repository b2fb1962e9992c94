"""Outputs are complete or absent, and get the usual file mode (not mkstemp's private one)."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from dit_video.files import atomic_dir, atomic_path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def expected(bits: int) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return bits & ~umask


def test_atomic_path_writes_whole_files_with_the_usual_mode(tmp_path):
    target = tmp_path / "a" / "w.safetensors"
    with atomic_path(target) as tmp:
        save_file({"x": torch.ones(3)}, str(tmp))  # safetensors itself creates private files
    assert mode(target) == expected(0o666)
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_bytes()[:8] != b"half" and os.listdir(target.parent) == ["w.safetensors"]


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "config.yaml").write_text("old\n")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "config.yaml").write_text("new\n")
        raise RuntimeError("killed")
    assert (target / "config.yaml").read_text() == "old\n" and os.listdir(tmp_path) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "config.yaml").write_text("new\n")
    assert (target / "config.yaml").read_text() == "new\n" and os.listdir(tmp_path) == ["model"]
    assert mode(target) == expected(0o777) and mode(target / "config.yaml") == expected(0o666)
