"""What every command-line entry shares: `CONFIG.yaml [key=value ...]` arguments, and bad input
reported as one line on stderr with exit code 2 instead of a traceback."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, TypeVar

from .config import ConfigError, load_config

T = TypeVar("T")


class UsageError(Exception):
    """Bad input from the user (a path, a value): reported as one line, exit code 2."""


def exits_cleanly(main: Callable[[list[str] | None], T]) -> Callable[[list[str] | None], T]:
    """Wrap an entry point so that UsageError and ConfigError print `error: ...` and exit 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> T:
        try:
            return main(argv)
        except (UsageError, ConfigError) as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper


def parse_config_args(cls: type[T], argv: list[str] | None, prog: str, description: str) -> T:
    """Parse `CONFIG.yaml [key=value ...]` into a validated `cls`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        epilog="Overrides are dotted keys with YAML values, e.g. steps=[4,16] schedule.logsnr_max=15.")
    parser.add_argument("config", help="a YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    return load_config(cls, args.config, args.overrides)
