"""Backbones behind one interface (`build_backbone`), and the attention they share."""

from .attention import BACKENDS, attention, resolve_backend, xformers_kernels
from .dit import DiT, DiTConfig
from .registry import BACKBONES, build_backbone, compile_blocks
from .unet3d import UNet3D, UNet3DConfig

__all__ = ["attention", "resolve_backend", "xformers_kernels", "BACKENDS", "DiT", "DiTConfig", "UNet3D", "UNet3DConfig",
           "build_backbone", "compile_blocks", "BACKBONES"]
