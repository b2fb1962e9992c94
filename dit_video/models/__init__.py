"""Backbones behind one interface (`build_backbone`), and the attention they share."""

from .attention import BACKENDS, attention, resolve_backend
from .dit import DiT, DiTConfig
from .registry import BACKBONES, build_backbone

__all__ = ["attention", "resolve_backend", "BACKENDS", "DiT", "DiTConfig", "build_backbone", "BACKBONES"]
