"""What the DeepSpeed engine trains in the diffusion stages: the backbone and, when it learns
with the model, the byte-level text encoder, behind one forward that returns the loss.

Everything random in a step (noise level, noise, caption dropout) is drawn from the loop's
generator, whose state is checkpointed, so a resumed run repeats the same steps exactly. The
frozen parts (VAE, T5) stay outside: they would only weigh on the optimizer and the checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion import DiffusionConfig, training_loss


class DiffusionObjective(nn.Module):
    def __init__(self, backbone: nn.Module, diffusion: DiffusionConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        self.backbone, self.text_encoder, self.diffusion = backbone, text_encoder, diffusion

    def forward(self, latents: torch.Tensor, generator: torch.Generator, captions: list[str] | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                dropped: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                cond_logsnr: torch.Tensor | None = None, is_image: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of a batch. Text comes either as `captions` for the trained text encoder
        or as already encoded `text` / `text_mask` (a frozen encoder). A caption `dropped` for
        classifier-free guidance gets an all-False mask, which the backbone reads as its learned
        null text: exactly what the sampler's unconditional branch sees."""
        if captions is not None:
            text, text_mask = self.text_encoder(captions)
        if dropped is not None:
            text_mask = text_mask & ~dropped.to(text_mask.device)[:, None]
        dtype = next(self.backbone.parameters()).dtype  # bf16 under DeepSpeed's bf16 mode

        def backbone(z, logsnr, **kwargs):  # targets and loss stay in float32, the network runs in `dtype`
            return self.backbone(z.to(dtype), logsnr, **kwargs)

        loss = training_loss(backbone, latents.float(), self.diffusion, generator=generator, text=text,
                             text_mask=text_mask, cond=None if cond is None else cond.to(dtype),
                             cond_logsnr=cond_logsnr, is_image=is_image)
        return loss.mean()
