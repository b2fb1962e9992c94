"""The causal 3D video autoencoder that maps pixels [B, 3, 1 + f*k, H, W] in [-1, 1] to latents."""
