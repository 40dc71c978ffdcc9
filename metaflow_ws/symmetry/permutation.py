"""Neuron permutations of a batch of networks.

A permutation of hidden layer ``l`` (the outputs of ``layers.l``, ``l = 0 .. L-2``) is an int64 tensor
``perm: [B, n_{l+1}]`` per network with the convention *new neuron i = old neuron perm[i]*. Applying it permutes
the rows of ``layers.l.weight``, the entries of ``layers.l.bias`` and the columns of ``layers.{l+1}.weight``
together, which leaves every network's function unchanged (for any elementwise activation).

A full permutation of a spec is a tuple with one such tensor per hidden layer (empty for a network without
hidden layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec, Params

__all__ = [
    "Perms",
    "apply_permutation",
    "check_permutation",
    "compose_permutations",
    "identity_permutation",
    "invert_permutation",
    "permute_cols",
    "permute_rows",
    "random_permutation",
]

#: One ``[B, n_l]`` int64 tensor per hidden layer.
Perms = tuple[Tensor, ...]


def permute_rows(t: Tensor, perm: Tensor) -> Tensor:
    """``t: [B, n, ...]``, ``perm: [B, n]`` → ``out[b, i] = t[b, perm[b, i]]``."""
    idx = perm.reshape(*perm.shape, *([1] * (t.dim() - 2))).expand_as(t)
    return torch.gather(t, 1, idx)


def permute_cols(t: Tensor, perm: Tensor) -> Tensor:
    """``t: [B, m, n]``, ``perm: [B, n]`` → ``out[b, :, j] = t[b, :, perm[b, j]]``."""
    return torch.gather(t, 2, perm.unsqueeze(1).expand_as(t))


def check_permutation(spec: NetworkSpec, perms: Sequence[Tensor], batch: int | None = None) -> Perms:
    """Validate ``perms`` against ``spec`` and return them as a tuple of ``[B, n_l]`` int64 tensors.

    An unbatched ``[n_l]`` tensor is broadcast to ``batch`` networks. Each row must be a permutation of
    ``0 .. n_l-1``; the error names the layer and what came.
    """
    hidden = spec.hidden_widths
    if len(perms) != len(hidden):
        raise ValueError(
            f"{spec.describe()} has {len(hidden)} hidden layers, so it needs {len(hidden)} permutations; "
            f"got {len(perms)}"
        )
    out = []
    for layer, (p, n) in enumerate(zip(perms, hidden)):
        if not isinstance(p, Tensor) or p.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"permutation of hidden layer {layer} must be an integer tensor; got {type(p).__name__}"
                             f"{'' if not isinstance(p, Tensor) else ' of dtype ' + str(p.dtype)}")
        p = p.long()
        if p.dim() == 1 and batch is not None:
            p = p.unsqueeze(0).expand(batch, -1)
        if p.dim() != 2 or p.shape[1] != n or (batch is not None and p.shape[0] != batch):
            want = f"({batch if batch is not None else 'B'}, {n})"
            raise ValueError(
                f"permutation of hidden layer {layer} must have shape {want} or ({n},); got {tuple(p.shape)}"
            )
        ref = torch.arange(n, device=p.device).expand_as(p)
        if not torch.equal(torch.sort(p, dim=1).values, ref):
            raise ValueError(f"rows of the permutation of hidden layer {layer} must each hold 0..{n - 1} exactly once")
        out.append(p)
    return tuple(out)


def identity_permutation(
    spec: NetworkSpec, batch: int, *, device: torch.device | str | None = None
) -> Perms:
    """The identity permutation of ``batch`` networks: ``[B, n_l]`` rows ``0 .. n_l-1``."""
    return tuple(torch.arange(n, device=device).expand(batch, n).clone() for n in spec.hidden_widths)


def random_permutation(
    spec: NetworkSpec,
    batch: int,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> Perms:
    """Independent uniformly random permutations of every hidden layer of ``batch`` networks.

    ``generator`` makes the draw reproducible; ``None`` means a fresh ``torch.Generator`` seeded 0 (the global
    RNG is never used). Returns one ``[B, n_l]`` int64 tensor per hidden layer.
    """
    if batch < 0:
        raise ValueError(f"batch must be ≥ 0; got {batch}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return tuple(
        torch.argsort(torch.rand(batch, n, generator=g), dim=1).to(device) for n in spec.hidden_widths
    )


def invert_permutation(perms: Sequence[Tensor]) -> Perms:
    """The inverse of each ``[B, n]`` permutation: ``inv[b, perm[b, i]] = i``."""
    return tuple(torch.argsort(p, dim=-1) for p in perms)


def compose_permutations(first: Sequence[Tensor], second: Sequence[Tensor]) -> Perms:
    """The permutation equal to applying ``first`` and then ``second``: ``out[b, i] = first[b, second[b, i]]``."""
    if len(first) != len(second):
        raise ValueError(f"cannot compose permutations of {len(first)} and {len(second)} hidden layers")
    return tuple(torch.gather(f, -1, s) for f, s in zip(first, second))


def apply_permutation(spec: NetworkSpec, params: Mapping[str, Tensor], perms: Sequence[Tensor]) -> Params:
    """Permute the hidden neurons of a batch of networks (function preserving).

    Args:
        spec: the architecture.
        params: ``{name: [B, ...]}``.
        perms: one ``[B, n_l]`` (or ``[n_l]``, shared) int64 tensor per hidden layer, *new neuron i = old neuron
            perm[i]*.

    Returns:
        a new parameter dict ``{name: [B, ...]}``: for hidden layer l the rows of ``layers.l.weight``, the entries
        of ``layers.l.bias`` and the columns of ``layers.{l+1}.weight`` are permuted together.
    """
    b = spec.batch_size(params)
    perms = check_permutation(spec, perms, batch=b)
    out = dict(params)
    for layer, p in enumerate(perms):
        p = p.to(out[f"layers.{layer}.weight"].device)
        out[f"layers.{layer}.weight"] = permute_rows(out[f"layers.{layer}.weight"], p)
        out[f"layers.{layer}.bias"] = permute_rows(out[f"layers.{layer}.bias"], p)
        out[f"layers.{layer + 1}.weight"] = permute_cols(out[f"layers.{layer + 1}.weight"], p)
    return {n: out[n] for n in spec.shapes}
