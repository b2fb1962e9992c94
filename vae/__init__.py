"""The causal 3D video autoencoder: pixels [B, 3, 1 + f*k, H, W] in [-1, 1] to latents."""

from .config import VAEConfig
from .model import VideoVAE

__all__ = ["VAEConfig", "VideoVAE"]
