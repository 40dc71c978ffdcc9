"""Weight coordinates of the three flows: how a batch of networks becomes the flat vectors a flow models.

- ``euclidean``: raw (optionally aligned) flat weights ``[B, D]``; data and path are Euclidean.
- ``normalized``: scale-canonicalized coordinates ``[B, D + 1]`` (product of spheres × R, see
  ``docs/INTERFACES.md``); the path and vector field are Euclidean in the ambient space, predictions are
  projected onto the product manifold.
- ``geometric``: the same coordinates with Riemannian flow matching on the product manifold (geodesic paths,
  exponential-map steps).

The prior p0 is the zoo's init distribution N(0, σ²I) over ordinary weights, pushed into the coordinates
(canonicalized for the normalized/geometric flows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec, Params

__all__ = ["FLOWS", "FlowKind", "WeightCoordinates"]

FlowKind = Literal["euclidean", "normalized", "geometric"]
FLOWS: tuple[str, ...] = ("euclidean", "normalized", "geometric")


@dataclass(frozen=True)
class WeightCoordinates:
    """Encoder/decoder between networks and flow coordinates, with the manifolds a flow of ``kind`` uses."""

    spec: NetworkSpec
    kind: FlowKind

    def __post_init__(self) -> None:
        if self.kind not in FLOWS:
            raise ValueError(f"unknown flow {self.kind!r}; expected one of {list(FLOWS)}")
        if self.kind != "euclidean" and not self.spec.positively_homogeneous:
            raise ValueError(
                f"the {self.kind} flow canonicalizes ReLU scaling, which needs a positively homogeneous activation "
                f"(relu, leaky_relu); {self.spec.describe()} uses {self.spec.activation!r}. Use --flow euclidean."
            )

    @property
    def canonical(self) -> bool:
        return self.kind != "euclidean"

    @property
    def dim(self) -> int:
        return self.spec.num_params + (1 if self.canonical else 0)

    @property
    def n_globals(self) -> int:
        """Trailing coordinates that are not weights or biases (the last layer's log-scale)."""
        return 1 if self.canonical else 0

    @property
    def data_manifold(self):
        """Where samples live: Euclidean, or the product of spheres × R."""
        from metaflow_ws.geometry import euclidean_for, product_manifold_for

        return product_manifold_for(self.spec) if self.canonical else euclidean_for(self.spec)

    @property
    def path_manifold(self):
        """Geometry of the probability path: the product manifold only for the geometric flow."""
        from metaflow_ws.geometry import Euclidean, product_manifold_for

        if self.kind == "geometric":
            return product_manifold_for(self.spec)
        return Euclidean(self.dim)

    def encode(self, params: Params) -> Tensor:
        """``{name: [B, ...]}`` → ``[B, dim]``."""
        if not self.canonical:
            return self.spec.flatten(params)
        from metaflow_ws.symmetry.scaling import to_canonical

        return to_canonical(self.spec, params)

    def decode(self, x: Tensor) -> Params:
        """``[B, dim]`` → ``{name: [B, ...]}`` (ordinary weights computing the same functions)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{self.kind} coordinates for {self.spec.describe()} must be (B, {self.dim}); "
                             f"got {tuple(x.shape)}")
        if not self.canonical:
            return self.spec.unflatten(x)
        from metaflow_ws.symmetry.scaling import from_canonical

        return from_canonical(self.spec, x)

    def sample_prior(self, n: int, std: float, *, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """``n`` draws of N(0, std²) networks, in these coordinates: ``[n, dim]``."""
        flat = torch.randn(n, self.spec.num_params, generator=generator, dtype=dtype) * std
        flat = flat.to(device) if device is not None else flat
        return self.encode(self.spec.unflatten(flat)) if self.canonical else flat

