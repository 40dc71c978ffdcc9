"""ReLU positive-scaling symmetry: rescaling neurons and the canonical (scale-free) coordinates.

For a positively homogeneous activation (``f(c·x) = c·f(x)`` for c > 0: ReLU, leaky ReLU, identity), multiplying
a hidden neuron's incoming weights and bias by ``c > 0`` and dividing its outgoing weights by ``c`` leaves the
network's function unchanged. :func:`canonicalize` (Pittorino et al. 2022) fixes that freedom: layer by layer,
every hidden neuron's incoming weight row and bias are divided by the row's norm and its outgoing weights are
multiplied by it, so all scale ends up in the last weight matrix.

Canonical coordinates (``docs/INTERFACES.md``): a flat ``[B, D + 1]`` vector, spec-ordered parameters with
unit-norm hidden weight rows, a unit-Frobenius last weight matrix and Euclidean biases, followed by
``log_scale`` = log of the last weight matrix's Frobenius norm after the hidden rescaling. :func:`to_canonical`
and :func:`from_canonical` map between ordinary weights and these coordinates; ``from_canonical(to_canonical(θ))``
is a network with exactly θ's function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec, Params

__all__ = [
    "canonical_dim",
    "canonicalize",
    "from_canonical",
    "random_scales",
    "rescale_neurons",
    "to_canonical",
]

#: Row norms at or below this are left unscaled (a zero row cannot be put on the sphere).
EPS = 1e-12


def _require_homogeneous(spec: NetworkSpec) -> None:
    if not spec.positively_homogeneous:
        raise ValueError(
            f"scale canonicalization needs a positively homogeneous activation (relu, leaky_relu or identity); "
            f"{spec.describe()} uses {spec.activation!r}, which has no positive scaling symmetry"
        )


def _check_finite(params: Mapping[str, Tensor], what: str = "parameter") -> None:
    for n, t in params.items():
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)).nonzero().flatten().tolist()
            raise ValueError(f"{what} {n!r} contains NaN or infinite values (networks {bad[:10]}); "
                             "cannot canonicalize")


def canonical_dim(spec: NetworkSpec) -> int:
    """Length of one network's canonical coordinates: ``spec.num_params + 1`` (the trailing ``log_scale``)."""
    return spec.num_params + 1


def rescale_neurons(spec: NetworkSpec, params: Mapping[str, Tensor], scales: Sequence[Tensor]) -> Params:
    """Apply the positive-scaling symmetry (function preserving for positively homogeneous activations).

    Args:
        spec: the architecture.
        params: ``{name: [B, ...]}``.
        scales: one ``[B, n_l]`` (or ``[n_l]``, shared) tensor of positive factors per hidden layer: neuron i of
            hidden layer l gets its incoming row and bias multiplied by ``scales[l][:, i]`` and its outgoing
            column in ``layers.{l+1}.weight`` divided by it.

    Returns:
        a new ``{name: [B, ...]}``.
    """
    _require_homogeneous(spec)
    b = spec.batch_size(params)
    if len(scales) != len(spec.hidden_widths):
        raise ValueError(f"{spec.describe()} needs {len(spec.hidden_widths)} scale tensors (one per hidden layer); "
                         f"got {len(scales)}")
    out = dict(params)
    for layer, (c, n) in enumerate(zip(scales, spec.hidden_widths)):
        c = c.expand(b, n) if c.dim() == 1 and c.shape[0] == n else c
        if c.shape != (b, n):
            raise ValueError(
                f"scales of hidden layer {layer} must have shape ({b}, {n}) or ({n},); got {tuple(c.shape)}"
            )
        if not (torch.isfinite(c).all() and (c > 0).all()):
            raise ValueError(f"scales of hidden layer {layer} must be finite and > 0")
        w = out[f"layers.{layer}.weight"]
        c = c.to(w.device, w.dtype)
        out[f"layers.{layer}.weight"] = w * c.unsqueeze(-1)
        out[f"layers.{layer}.bias"] = out[f"layers.{layer}.bias"] * c
        out[f"layers.{layer + 1}.weight"] = out[f"layers.{layer + 1}.weight"] / c.unsqueeze(1)
    return {n: out[n] for n in spec.shapes}


def random_scales(
    spec: NetworkSpec,
    batch: int,
    generator: torch.Generator | None = None,
    *,
    low: float = 0.25,
    high: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, ...]:
    """Log-uniform positive factors in ``[low, high]``: one ``[B, n_l]`` tensor per hidden layer (for tests and
    symmetry augmentation). ``generator=None`` → a ``torch.Generator`` seeded 0."""
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low ≤ high; got low={low}, high={high}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    lo, hi = torch.log(torch.tensor(low, dtype=torch.float64)), torch.log(torch.tensor(high, dtype=torch.float64))
    return tuple(
        torch.exp(lo + (hi - lo) * torch.rand(batch, n, generator=g, dtype=torch.float64)).to(dtype)
        for n in spec.hidden_widths
    )


def canonicalize(spec: NetworkSpec, params: Mapping[str, Tensor], *, eps: float = EPS) -> Params:
    """The scale-canonical equivalent of each network (same function).

    Layer by layer (so the norms propagate forward into the last layer), each hidden neuron's incoming weight row
    and bias are divided by the row's Euclidean norm and its outgoing column is multiplied by it. Rows with norm
    ``≤ eps`` are left unchanged (a zero row has no direction). The last layer keeps all of the scale.

    Args:
        params: ``{name: [B, ...]}``. Returns ``{name: [B, ...]}`` whose hidden weight rows have unit norm.
    """
    _require_homogeneous(spec)
    spec.batch_size(params)
    _check_finite(params)
    out = {n: params[n] for n in spec.shapes}
    for layer in range(spec.num_layers - 1):
        w = out[f"layers.{layer}.weight"]
        norm = torch.linalg.vector_norm(w, dim=-1)  # [B, n]
        s = torch.where(norm > eps, norm, torch.ones_like(norm))
        out[f"layers.{layer}.weight"] = w / s.unsqueeze(-1)
        out[f"layers.{layer}.bias"] = out[f"layers.{layer}.bias"] / s
        out[f"layers.{layer + 1}.weight"] = out[f"layers.{layer + 1}.weight"] * s.unsqueeze(1)
    return out


def to_canonical(spec: NetworkSpec, params: Mapping[str, Tensor], *, eps: float = EPS) -> Tensor:
    """Canonical coordinates ``[B, D + 1]`` of ``params: {name: [B, ...]}`` (layout in ``docs/INTERFACES.md``).

    Hidden rows unit norm (as :func:`canonicalize`), ``layers.{L-1}.weight`` divided by its Frobenius norm
    (clamped to ``eps``), biases as after canonicalization, last column ``log_scale`` = log of that norm.
    """
    p = canonicalize(spec, params, eps=eps)
    last = f"layers.{spec.num_layers - 1}.weight"
    w = p[last]
    scale = torch.linalg.vector_norm(w.flatten(1), dim=1).clamp_min(eps)  # [B]
    p[last] = w / scale.view(-1, 1, 1)
    return torch.cat([spec.flatten(p), torch.log(scale).unsqueeze(1)], dim=1)


def from_canonical(
    spec: NetworkSpec, flat: Tensor, *, project: bool = False, eps: float = EPS
) -> Params:
    """Ordinary weights from canonical coordinates: the inverse of :func:`to_canonical`.

    Args:
        flat: ``[B, D + 1]`` (or ``[D + 1]`` for one network, which returns unbatched ``{name: [...]}``).
        project: first put the sphere blocks back on their spheres (each hidden weight row and the last weight
            matrix divided by its norm, biases untouched): use it for points that drifted off the manifold, e.g.
            an unprojected model output. Without it the blocks are taken as they are.

    Returns:
        ``{name: [B, ...]}`` with ``layers.{L-1}.weight = exp(log_scale) · block``; for canonical coordinates of θ
        this is :func:`canonicalize` (θ), a network with θ's function.
    """
    _require_homogeneous(spec)
    single = flat.dim() == 1
    if single:
        flat = flat.unsqueeze(0)
    d = canonical_dim(spec)
    if flat.dim() != 2 or flat.shape[1] != d:
        raise ValueError(f"canonical coordinates of {spec.describe()} must have shape (B, {d}) = (B, D + 1); "
                         f"got {tuple(flat.shape) if not single else tuple(flat.shape[1:])}")
    if not torch.isfinite(flat).all():
        bad = (~torch.isfinite(flat).all(1)).nonzero().flatten().tolist()
        raise ValueError(f"canonical coordinates contain NaN or infinite values (networks {bad[:10]})")
    p = dict(spec.unflatten(flat[:, :-1].clone()))
    log_scale = flat[:, -1]
    last = f"layers.{spec.num_layers - 1}.weight"
    if project:
        for layer in range(spec.num_layers - 1):
            w = p[f"layers.{layer}.weight"]
            p[f"layers.{layer}.weight"] = w / torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_min(eps)
        w = p[last]
        p[last] = w / torch.linalg.vector_norm(w.flatten(1), dim=1).clamp_min(eps).view(-1, 1, 1)
    p[last] = p[last] * torch.exp(log_scale).view(-1, 1, 1)
    return {n: t[0] for n, t in p.items()} if single else p
