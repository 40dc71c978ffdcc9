"""Task losses for one network (pure functions of an unbatched parameter dict, safe under vmap/grad)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec

__all__ = ["loss_fn", "prediction_loss"]


def prediction_loss(out: Tensor, y: Tensor, kind: str) -> Tensor:
    """Mean cross-entropy (classification) or mean squared error (regression).

    For classification ``y`` is ``(N,)`` int labels or ``(N, C)`` float class probabilities (one-hot targets
    give the same loss as labels; the elementwise form is several times cheaper under ``vmap``).
    """
    if kind == "classification":
        if y.is_floating_point():
            if y.shape != out.shape:
                raise ValueError(f"soft targets must have the logits' shape {tuple(out.shape)}; got {tuple(y.shape)}")
            return -(torch.log_softmax(out, dim=-1) * y).sum(-1).mean()
        return torch.nn.functional.cross_entropy(out, y)
    if kind == "regression":
        return torch.mean((out - y) ** 2)
    raise ValueError(f"no training loss for task kind {kind!r}; expected 'classification' or 'regression'")


def loss_fn(spec: NetworkSpec, kind: str) -> Callable[..., Tensor]:
    """``loss(params, x, y)`` for one network (unbatched parameter dict)."""
    if kind not in ("classification", "regression"):
        raise ValueError(f"no training loss for task kind {kind!r}; expected 'classification' or 'regression'")

    def loss(params: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return prediction_loss(spec.forward(params, x), y, kind)

    return loss
