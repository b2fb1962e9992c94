"""dit_video: Sora-style video diffusion (space-time DiT over VAE latents) with the samplers,
guidance and cascade of Video Diffusion Models and Imagen Video."""

__version__ = "0.1.0"
