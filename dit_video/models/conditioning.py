"""The conditioning every backbone shares: a vector from the noise level, the cascade's
augmentation level, pooled text and, in a guidance-distilled student, the guidance weight w (for
adaLN or scale-shift), and the projected text tokens with their mask (for cross-attention). A
learned null text stands in when no text is given, and for a sample whose text mask is all False
(a caption dropped for classifier-free guidance).

The pooled text joins the vector through an MLP (`text_pool: mlp`) or one linear map (`linear`).
The linear map keeps the vector a sum of its words' parts, which the adaLN layers read apart at
once; through the MLP, words that must act together with position ("moving right": on the left
at the start) were not learned in the tiny pipeline's budget (its README has the comparison).

The guidance embedding's last layer starts at zero: a student given the input and loaded with the
weights of a teacher without it computes exactly the teacher's function until it is trained."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from .embeddings import fourier_features


class Conditioning(nn.Module):
    def __init__(self, freq_dim: int, width: int, cond: bool, text_dim: int, context_dim: int,
                 guidance: bool = False, text_pool: str = "mlp"):
        super().__init__()
        self.freq_dim, self.text_dim = freq_dim, text_dim
        self.noise = Mlp(freq_dim, width, width, act_layer=nn.SiLU)
        self.cond_noise = Mlp(freq_dim, width, width, act_layer=nn.SiLU) if cond else None
        if text_dim:
            self.text_proj = nn.Linear(text_dim, context_dim)
            self.text_pool = Mlp(context_dim, width, width, act_layer=nn.SiLU) if text_pool == "mlp" \
                else nn.Linear(context_dim, width)
            self.null_text = nn.Parameter(torch.randn(1, text_dim) * 0.02)  # for classifier-free guidance
        # made last, so the other layers draw the same initial weights with or without it
        self.guidance = Mlp(freq_dim, width, width, act_layer=nn.SiLU) if guidance else None
        if self.guidance is not None:  # adds exactly 0 until trained (see the module docstring)
            nn.init.zeros_(self.guidance.fc2.weight)
            nn.init.zeros_(self.guidance.fc2.bias)

    def forward(self, logsnr, cond_logsnr, text, text_mask, batch: int, dtype: torch.dtype, guidance=None):
        """(vector [B, width], context [B, L, context_dim] or None, mask [B, L] or None)."""
        c = self.noise(fourier_features(logsnr, self.freq_dim).to(dtype))
        w = self._guidance_weight(guidance, batch, c.device)
        if w is not None:
            c = c + self.guidance(fourier_features(w, self.freq_dim).to(dtype))
        if self.cond_noise is not None:
            if cond_logsnr is None:
                raise ValueError("cond_logsnr (the augmentation level of cond) is required with cond")
            c = c + self.cond_noise(fourier_features(cond_logsnr, self.freq_dim).to(dtype))
        if not self.text_dim:
            return c, None, None
        if text is None:
            text, text_mask = self.null_text.expand(batch, 1, -1), None
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device) if text_mask is None else text_mask
        # A caption dropped for guidance (all-False mask) gets the null text in its first slot, as with
        # no text. Always in the graph, even when nothing is dropped: every process must produce the
        # same gradients, or ZeRO-3's reductions go out of step.
        first = torch.zeros_like(mask)
        first[:, 0] = True
        slot = ~mask.any(dim=1, keepdim=True) & first
        text = torch.where(slot[..., None], self.null_text.to(text.dtype), text)
        mask = mask | slot
        context = self.text_proj(text.to(dtype))
        pooled = (context * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return c + self.text_pool(pooled), context, mask

    def _guidance_weight(self, guidance, batch: int, device) -> torch.Tensor | None:
        """The [B] float32 weight w, checked against whether this model takes it."""
        if self.guidance is None:
            if guidance is not None:
                raise ValueError("this model has no guidance input (guidance_input: false), yet got a guidance weight")
            return None
        if guidance is None:
            raise ValueError("this model takes the guidance weight as an input (guidance_input: true): "
                             "pass guidance, a [B] float tensor")
        w = torch.as_tensor(guidance, device=device).float()
        if w.ndim > 1 or w.numel() not in (1, batch):
            raise ValueError(f"guidance must be a [B] tensor with B = {batch}, got shape {tuple(w.shape)}")
        return w.reshape(-1).expand(batch)
