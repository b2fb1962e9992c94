"""An exponential moving average of the trainable weights, in float32, correct under ZeRO-3.

Under ZeRO-3 each process holds only a shard of every parameter, so the average is taken over
the full parameters, gathered a few at a time with DeepSpeed's public `GatheredParameters`
(a no-op for parameters that are not partitioned, so ZeRO 0-2 take the same path). All processes
join each gather; only rank 0 keeps the average, which is what exports and samples read.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    def __init__(self, module: nn.Module, decay: float, rank: int, gather_size: int = 32):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay, self.rank, self.gather_size = decay, rank, gather_size
        self.named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.shadow: dict[str, torch.Tensor] = {}
        self._visit(lambda name, full: self.shadow.__setitem__(name, full.detach().float().clone()))

    @torch.no_grad()
    def update(self) -> None:
        def blend(name: str, full: torch.Tensor) -> None:
            self.shadow[name].lerp_(full.detach().float(), 1 - self.decay)

        self._visit(blend)

    def _visit(self, fn) -> None:
        """Call fn(name, full parameter) on rank 0 for every parameter, gathering in chunks."""
        import deepspeed

        for start in range(0, len(self.named), self.gather_size):
            chunk = self.named[start:start + self.gather_size]
            with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
                if self.rank == 0:
                    for name, p in chunk:
                        fn(name, p)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights by parameter name (empty on ranks other than 0)."""
        return {name: t.cpu().contiguous() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.rank != 0:
            return
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, t in state.items():
            self.shadow[name].copy_(t)
