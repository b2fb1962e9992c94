"""What the DeepSpeed engine trains: per stage, the trainable modules behind one forward that
returns the loss (and the metrics to log). In the diffusion stages, the backbone and, when it
learns with the model, the byte-level text encoder; in the distill stage, the student's backbone
and text encoder (the teacher's targets come in with the batch); in the vae stage, the VAE and
its discriminator.

Everything random in a step (noise level, noise, caption dropout) is drawn from the loop's
generator, whose state is checkpointed, so a resumed run repeats the same steps exactly. The
frozen parts (VAE, T5) stay outside: they would only weigh on the optimizer and the checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from vae.losses import hinge_discriminator_loss, hinge_generator_loss, kl_loss, reconstruction_loss

from ..diffusion import DiffusionConfig, distillation_loss, training_loss
from ..diffusion.parameterization import Prediction
from ..eval.metrics import psnr


class DiffusionObjective(nn.Module):
    def __init__(self, backbone: nn.Module, diffusion: DiffusionConfig, text_encoder: nn.Module | None = None):
        super().__init__()
        self.backbone, self.text_encoder, self.diffusion = backbone, text_encoder, diffusion

    def forward(self, latents: torch.Tensor, generator: torch.Generator, captions: list[str] | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                dropped: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                cond_logsnr: torch.Tensor | None = None, is_image: torch.Tensor | None = None) -> dict:
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
        return {"loss": loss.mean()}


class DistillObjective(nn.Module):
    """The student of progressive distillation: its output at (z_t, logsnr) against the teacher's
    target x_tilde (made by the stage, outside the engine), with the truncated-SNR loss in the
    student's `prediction` space. Text as in DiffusionObjective; `guidance` is the weight w the
    teacher was guided with, for a student that takes it as an input."""

    def __init__(self, backbone: nn.Module, prediction: Prediction, text_encoder: nn.Module | None = None):
        super().__init__()
        self.backbone, self.text_encoder, self.prediction = backbone, text_encoder, prediction

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, target: torch.Tensor, captions: list[str] | None = None,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                dropped: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                cond_logsnr: torch.Tensor | None = None, is_image: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> dict:
        if captions is not None:
            text, text_mask = self.text_encoder(captions)
        if dropped is not None:
            text_mask = text_mask & ~dropped.to(text_mask.device)[:, None]
        dtype = next(self.backbone.parameters()).dtype
        output = self.backbone(z.to(dtype), logsnr, text=text, text_mask=text_mask,
                               cond=None if cond is None else cond.to(dtype), cond_logsnr=cond_logsnr,
                               is_image=is_image, guidance=guidance)
        return {"loss": distillation_loss(output, z, target, logsnr, self.prediction).mean()}


class VAEObjective(nn.Module):
    """What the engine trains in the `vae` stage: L1 + L2 reconstruction, a small KL term and,
    with a discriminator, the hinge GAN losses of both players in one backward pass. The VAE's
    adversarial term sees the discriminator's weights detached (so it moves only the VAE), the
    discriminator's loss sees the reconstruction detached (so it moves only the discriminator);
    one optimizer then steps both. Before `adversarial` is on, both terms are weighted 0 but
    stay in the graph, so every process has gradients for the same parameters."""

    def __init__(self, vae: nn.Module, kl_weight: float, l1_weight: float, l2_weight: float,
                 discriminator: nn.Module | None = None, discriminator_weight: float = 0.0):
        super().__init__()
        self.vae, self.discriminator = vae, discriminator
        self.kl_weight, self.l1_weight, self.l2_weight = kl_weight, l1_weight, l2_weight
        self.discriminator_weight = discriminator_weight

    def forward(self, video: torch.Tensor, generator: torch.Generator, adversarial: bool = False) -> dict:
        x_hat, mean, logvar = self.vae(video.to(next(self.vae.parameters()).dtype), generator=generator)
        x_hat = x_hat.float()
        rec = reconstruction_loss(video, x_hat, self.l1_weight, self.l2_weight)
        kl = kl_loss(mean.float(), logvar.float())
        loss = rec + self.kl_weight * kl
        out = {"reconstruction": rec.detach(), "kl": kl.detach(),
               "psnr": psnr(x_hat.detach().clamp(-1, 1), video).mean()}
        if self.discriminator is not None:
            dtype = next(self.discriminator.parameters()).dtype
            frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
            fooled = hinge_generator_loss(functional_call(self.discriminator, frozen, (x_hat.to(dtype),)).float())
            judged = hinge_discriminator_loss(self.discriminator(video.to(dtype)).float(),
                                              self.discriminator(x_hat.detach().to(dtype)).float())
            on = 1.0 if adversarial else 0.0
            loss = loss + on * (self.discriminator_weight * fooled + judged)
            out.update(adversarial=fooled.detach(), discriminator=judged.detach())
        return {"loss": loss, **out}
