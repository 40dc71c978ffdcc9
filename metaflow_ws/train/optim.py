"""Functional optimizers over flat ``[R, D]`` parameter batches, with ``torch.optim`` semantics.

Each optimizer is a frozen dataclass with ``init(params) -> state`` and ``step(params, grads, state) ->
(params, state)``; states are dicts of tensors, so R networks are updated by a handful of elementwise kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SGD", "Adam", "FunctionalOptimizer", "make_optimizer"]

State = dict[str, Tensor]


@dataclass(frozen=True)
class SGD:
    """``torch.optim.SGD`` (momentum, L2 weight decay, Nesterov; no dampening)."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def init(self, params: Tensor) -> State:
        return {"buf": torch.zeros_like(params), "t": torch.zeros((), dtype=torch.int64)}

    def step(self, params: Tensor, grads: Tensor, state: State) -> tuple[Tensor, State]:
        g = grads + self.weight_decay * params if self.weight_decay else grads
        t = state["t"] + 1
        if self.momentum:
            buf = g.clone() if int(state["t"]) == 0 else self.momentum * state["buf"] + g
            g = g + self.momentum * buf if self.nesterov else buf
        else:
            buf = state["buf"]
        return params - self.lr * g, {"buf": buf, "t": t}


@dataclass(frozen=True)
class Adam:
    """``torch.optim.Adam`` (L2 weight decay added to the gradient, bias-corrected moments)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def init(self, params: Tensor) -> State:
        return {"m": torch.zeros_like(params), "v": torch.zeros_like(params), "t": torch.zeros((), dtype=torch.int64)}

    def step(self, params: Tensor, grads: Tensor, state: State) -> tuple[Tensor, State]:
        b1, b2 = self.betas
        g = grads + self.weight_decay * params if self.weight_decay else grads
        t = state["t"] + 1
        m = state["m"].lerp(g, 1 - b1)
        v = state["v"].mul(b2).addcmul_(g, g, value=1 - b2)
        tf = float(t)
        bc1, bc2 = 1 - b1**tf, 1 - b2**tf
        denom = (v.sqrt() / bc2**0.5).add_(self.eps)
        return params.addcdiv(m, denom, value=-self.lr / bc1), {"m": m, "v": v, "t": t}


FunctionalOptimizer = SGD | Adam


def make_optimizer(name: str, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, nesterov: bool = False) -> FunctionalOptimizer:
    if name == "sgd":
        return SGD(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return Adam(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected 'sgd' or 'adam'")
