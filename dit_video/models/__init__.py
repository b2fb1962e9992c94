"""Backbones behind one interface, and the attention they share."""

from .attention import BACKENDS, attention, resolve_backend

__all__ = ["attention", "resolve_backend", "BACKENDS"]
