"""Permutation-invariant task embeddings from support sets (Deep Sets; Zaheer et al. 2017).

A support set ``{(x_k, y_k)}`` of a task is embedded as ``ρ([mean_k φ(x_k, y_k), max_k φ(x_k, y_k)])``: the
element map ``φ`` sees each pair on its own, pooling is symmetric, so the embedding does not depend on the order
of the support points. Mean pooling keeps it stable across support sizes K; max pooling lets it pick out
extremes (e.g. a sinusoid's amplitude) that a mean washes out. Inputs are Fourier-featured (fixed random
frequencies) so that smooth functions of x are easy to read off from a handful of points.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SetEncoder", "SetEncoderConfig"]


@dataclass(frozen=True)
class SetEncoderConfig:
    """Sizes of a :class:`SetEncoder` (stored in a flow's ``config.json``)."""

    x_dim: int
    y_dim: int
    cond_dim: int = 32
    hidden: int = 64
    fourier: int = 16
    fourier_scale: float = 1.0

    def __post_init__(self) -> None:
        for k in ("x_dim", "y_dim", "cond_dim", "hidden"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"set encoder {k} must be ≥ 1; got {getattr(self, k)}")
        if self.fourier < 0:
            raise ValueError(f"set encoder fourier must be ≥ 0; got {self.fourier}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SetEncoder(nn.Module):
    """``(x: [B, K, x_dim], y: [B, K, y_dim]) → [B, cond_dim]``, invariant to permutations of the K points."""

    def __init__(self, config: SetEncoderConfig) -> None:
        super().__init__()
        self.config = c = config
        g = torch.Generator().manual_seed(0)  # fixed features: part of the architecture, not of the init
        self.register_buffer("freqs", c.fourier_scale * torch.randn(c.x_dim, c.fourier, generator=g))
        d_in = c.x_dim + c.y_dim + 2 * c.fourier
        h = c.hidden
        self.phi = nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, h))
        self.rho = nn.Sequential(nn.LayerNorm(2 * h), nn.Linear(2 * h, h), nn.GELU(), nn.Linear(h, c.cond_dim))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        c = self.config
        if x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2] or x.shape[2] != c.x_dim or y.shape[2] != c.y_dim:
            raise ValueError(
                f"support sets must be x: (B, K, {c.x_dim}) and y: (B, K, {c.y_dim}) with the same B and K; "
                f"got x {tuple(x.shape)}, y {tuple(y.shape)}"
            )
        if x.shape[1] == 0:
            raise ValueError("a support set needs at least one point (K ≥ 1)")
        x, y = x.to(self.freqs.dtype), y.to(self.freqs.dtype)
        feats = [x, y]
        if c.fourier:
            proj = 2 * math.pi * x @ self.freqs / 10.0
            feats += [proj.sin(), proj.cos()]
        e = self.phi(torch.cat(feats, -1))  # (B, K, h)
        return self.rho(torch.cat([e.mean(1), e.amax(1)], -1))
