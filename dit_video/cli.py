"""What every command-line entry shares: `CONFIG.yaml [key=value ...]` arguments, and bad input
reported as one line on stderr with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .config import ConfigError, load_config

T = TypeVar("T")


class UsageError(Exception):
    """Bad input from the user (a path, a value): reported as one line, exit code 2."""


def exits_cleanly(main: Callable[[list[str] | None], T]) -> Callable[[list[str] | None], T]:
    """Wrap an entry point so that UsageError and ConfigError print `error: ...` and exit 2, and
    so does an OSError (a full disk, a folder that refuses files): the file system is the
    user's to fix, and outputs are written atomically, so nothing half-written stays behind."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> T:
        try:
            return main(argv)
        except (UsageError, ConfigError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def config_arguments(argv: list[str] | None, prog: str, description: str) -> tuple[str, list[str]]:
    """Parse `CONFIG.yaml [key=value ...]`: the config path and the overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides are dotted keys with YAML values, e.g. steps=[4,16] schedule.logsnr_max=15.")
    parser.add_argument("config", help="a YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def parse_config_args(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse `CONFIG.yaml [key=value ...]` into a validated `cls`."""
    return load_config(cls, *config_arguments(argv, prog, description))


def parse_device(spec: str, what: str = "--device") -> torch.device:
    """The torch device `spec` names (cpu, cuda, cuda:1), or a UsageError naming `what` when it is
    not a device, not one this machine has, or not one the project runs on."""
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UsageError(f"{what} {spec}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"{what} {spec}: the project runs on cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{what} {spec}: no such CUDA device here")
    return device


def check_output_dir(out: str | os.PathLike) -> None:
    """UsageError unless `out` is a directory, or one could be made there; creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    _check_writable(out, out)


def check_output_path(out: str | os.PathLike) -> None:
    """UsageError unless `out` could be written, checked before any work and creating nothing."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{out}: is a directory")
    _check_writable(out.parent, out)


def _check_writable(folder: Path, out: Path) -> None:
    """`folder`, or the nearest ancestor that exists, must be a directory that takes a new file.
    Permission bits are not enough (root on a read-only mount, /proc), so a probe file is
    created and removed."""
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{out}: cannot write there ({folder} is not a writable directory)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{out}: cannot write there ({folder} refuses new files: {e.strerror})") from None
