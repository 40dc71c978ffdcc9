"""Couplings between prior draws x0 and data x1 for conditional flow matching.

A coupling is its own object (not baked into the path): ``coupling(x0, x1) -> (x0', x1')`` returns the training
pairs ``(x0'[i], x1'[i])``:

- ``independent``: as drawn;
- ``ot``: mini-batch optimal transport, the prior batch reordered by an exact assignment;
- ``perm``: every data network replaced by the permutation of its hidden neurons closest to its prior draw
  (weight matching to x0; the *equivariant OT* of Klein et al. 2023). The vector field is permutation
  equivariant, so it can only push an invariant prior onto the permutation-symmetrised data distribution; near
  t = 0 the x1-prediction target is then an average over all neuron orderings. Matching each x1 to its x0 picks,
  among the functionally identical copies of x1, the one the straight path from x0 reaches fastest, so the
  paths are short and the target at small t is far less ambiguous. It never mixes networks, so it is also
  valid for task-conditioned flows;
- ``ot-perm``: ``ot`` pairing, then ``perm`` within each pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["COUPLINGS", "IndependentCoupling", "OTCoupling", "PermutationCoupling", "make_coupling", "pairwise_cost"]

COUPLINGS = ("independent", "ot", "perm", "ot-perm")


@dataclass(frozen=True)
class IndependentCoupling:
    """Pairs prior and data draws as they come."""

    def __call__(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        return x0, x1


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

    def __call__(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        from scipy.optimize import linear_sum_assignment

        if x0.shape != x1.shape:
            raise ValueError(f"OT coupling needs equal batches; got {tuple(x0.shape)} and {tuple(x1.shape)}")
        with torch.no_grad():
            c = pairwise_cost(x0, x1, self.manifold if self.cost == "geodesic" else None)
        rows, cols = linear_sum_assignment(c.double().cpu().numpy())
        order = np.empty_like(rows)
        order[cols] = rows  # x0 row matched to each x1 column
        return x0[torch.as_tensor(order, device=x0.device)], x1


@dataclass(frozen=True)
class PermutationCoupling:
    """Aligns each data draw to its (``base``-coupled) prior draw by weight matching of hidden neurons.

    ``coords`` maps flow coordinates to networks and back (every coordinate system of
    :mod:`metaflow_ws.flows.coordinates` is permutation equivariant, so permuting the decoded network and
    encoding it again permutes the coordinates). ``max_iter`` bounds the coordinate-descent sweeps.
    """

    coords: object
    base: IndependentCoupling | OTCoupling = IndependentCoupling()  # noqa: RUF009 - frozen, immutable
    max_iter: int = 20

    def __call__(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        from metaflow_ws.symmetry.align import weight_matching

        x0, x1 = self.base(x0, x1)
        spec = self.coords.spec
        if not spec.hidden_widths:
            return x0, x1
        with torch.no_grad():
            al = weight_matching(spec, self.coords.decode(x1), self.coords.decode(x0), max_iter=self.max_iter)
            return x0, self.coords.encode(al.params).to(x1.dtype)


def make_coupling(name: str, manifold=None, coords=None) -> IndependentCoupling | OTCoupling | PermutationCoupling:
    """The coupling called ``name`` (see :data:`COUPLINGS`); ``perm`` couplings need the flow's ``coords``."""
    ot = OTCoupling("geodesic" if manifold is not None else "euclidean", manifold)
    if name == "independent":
        return IndependentCoupling()
    if name == "ot":
        return ot
    if name in ("perm", "ot-perm"):
        if coords is None:
            raise ValueError(f"the {name!r} coupling needs the flow's coordinates (coords=flow.coords)")
        return PermutationCoupling(coords, ot if name == "ot-perm" else IndependentCoupling())
    raise ValueError(f"unknown coupling {name!r}; expected one of {list(COUPLINGS)}")
