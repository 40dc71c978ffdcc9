"""Couplings between prior draws x0 and data x1 for conditional flow matching: independent or mini-batch OT.

A coupling is its own object (not baked into the path): ``coupling(x0, x1) -> x0'`` returns the prior batch
reordered so that ``(x0'[i], x1[i])`` are the training pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["COUPLINGS", "IndependentCoupling", "OTCoupling", "make_coupling", "pairwise_cost"]

COUPLINGS = ("independent", "ot")


@dataclass(frozen=True)
class IndependentCoupling:
    """Pairs prior and data draws as they come."""

    def __call__(self, x0: Tensor, x1: Tensor) -> Tensor:
        return x0


def pairwise_cost(x0: Tensor, x1: Tensor, manifold=None) -> Tensor:
    """``[B0, B1]`` squared distances: Euclidean (``manifold=None``) or the manifold's geodesic distance."""
    if manifold is None:
        return torch.cdist(x0, x1).pow(2)
    b0, b1 = x0.shape[0], x1.shape[0]
    a = x0.unsqueeze(1).expand(b0, b1, -1).reshape(b0 * b1, -1)
    b = x1.unsqueeze(0).expand(b0, b1, -1).reshape(b0 * b1, -1)
    return manifold.dist(a, b).pow(2).reshape(b0, b1)


@dataclass(frozen=True)
class OTCoupling:
    """Mini-batch optimal transport: an exact assignment (scipy's Hungarian solver) minimising the summed
    squared distance within the batch. ``cost="geodesic"`` uses the manifold's distance."""

    cost: Literal["euclidean", "geodesic"] = "euclidean"
    manifold: object | None = None

    def __call__(self, x0: Tensor, x1: Tensor) -> Tensor:
        from scipy.optimize import linear_sum_assignment

        if x0.shape != x1.shape:
            raise ValueError(f"OT coupling needs equal batches; got {tuple(x0.shape)} and {tuple(x1.shape)}")
        with torch.no_grad():
            c = pairwise_cost(x0, x1, self.manifold if self.cost == "geodesic" else None)
        rows, cols = linear_sum_assignment(c.double().cpu().numpy())
        order = np.empty_like(rows)
        order[cols] = rows  # x0 row matched to each x1 column
        return x0[torch.as_tensor(order, device=x0.device)]


def make_coupling(name: str, manifold=None) -> IndependentCoupling | OTCoupling:
    if name == "independent":
        return IndependentCoupling()
    if name == "ot":
        return OTCoupling("geodesic" if manifold is not None else "euclidean", manifold)
    raise ValueError(f"unknown coupling {name!r}; expected one of {list(COUPLINGS)}")
