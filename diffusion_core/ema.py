"""Exponential moving average of a network's weights, the weights that sample."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """EMA of parameters and buffers in float32, with the warm-up of Tarvainen & Valpola 2017."""

    def __init__(self, net: nn.Module, *, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in net.state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module, step: int) -> None:
        d = self.decay_at(step)
        for k, v in net.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
