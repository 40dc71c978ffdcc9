"""Batched Riemannian geometry for flow matching over weights: Euclidean space, spheres and their product.

Every manifold works on whole batches with no per-sample Python loop:

- :class:`Euclidean` and :class:`Sphere` act on the **last** dimension of tensors with any leading batch dims
  (a layer's neurons are a batch of spheres ``[B, n_neurons, fan_in]``).
- :class:`ProductManifold` acts on a flat ``[..., D]`` tensor cut into :class:`Block` s: a block is a slice
  of the flat vector that is either Euclidean or reshaped to ``[..., n_spheres, sphere_dim]`` with
  :class:`Sphere` operations on its last dimension.

All manifolds share one interface (``x, y, v: (..., D)``; ``t``: scalar or ``(B,)`` for leading dim ``B``):

``interpolate(x0, x1, t)``
    geodesic ``exp_{x0}(t · log_{x0} x1)``.
``log(x, y)`` / ``exp(x, v)``
    logarithmic / exponential maps.
``velocity(x_t, x1, t)``
    conditional flow-matching target ``log_{x_t}(x1) / (1 − t)``; ``1 − t`` is clamped to at least
    :data:`T_EPS` so that the value stays finite at ``t = 1`` (the clamp only changes the value for
    ``t > 1 − T_EPS``, where the true target is ``log_{x_t}(x1) / (1 − t)`` with a vanishing numerator).
``project(x)`` / ``proj_tangent(x, v)``
    closest point on the manifold / orthogonal projection onto the tangent space at ``x``.
``dist(x, y)``
    geodesic distance reduced over the manifold's dims (``Sphere``: per sphere; product: per sample,
    ``sqrt`` of the sum of squared block distances).
``random_projected_normal(shape, std, generator=...)``
    the prior ``N(0, std² I)`` carried onto the manifold by projection.

Numerics. Sphere distances use ``atan2(|y − <x,y>x|, <x,y>)`` (accurate at all angles, unlike ``arccos``);
``log``/``exp`` use a small-angle series branch selected with ``torch.where`` on *safe* inputs so that identical
points give exactly ``log = 0`` with finite gradients. For an (exactly or numerically) **antipodal** pair the
geodesic is not unique: ``log`` then returns a vector of length π along a deterministic tangent direction
(the tangent part of the coordinate axis on which ``x`` is smallest), so values stay finite and geodesics
still move; near-antipodal pairs in float32 get a direction that is only as accurate as ``y + x``.
On the 0-sphere (``sphere_dim == 1``: two points ±1, e.g. fan-in-1 neurons) the tangent space is ``{0}``:
``log`` and ``velocity`` are zero and ``exp`` returns ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec

__all__ = [
    "T_EPS",
    "Block",
    "Euclidean",
    "Manifold",
    "ProductManifold",
    "Sphere",
    "euclidean_for",
    "product_manifold_for",
]

#: Smallest value of ``1 − t`` used by :meth:`Manifold.velocity`.
T_EPS: float = 1e-5

# Below this squared sine of the angle the sphere maps use their Taylor branch; the first neglected series
# term is O(θ⁴) relative, i.e. far below float64 precision at θ² < 1e-8.
_SMALL_SQ = 1e-8


def _as_shape(shape: Sequence[int] | int) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` reshaped to broadcast against ``x``: a scalar stays a scalar, ``(B,)`` (or ``(B, 1)``) becomes
    ``(B, 1, ..., 1)``. The shape of ``t`` without trailing 1s must be a prefix of ``x.shape[:-1]``."""
    if not isinstance(t, Tensor):
        return torch.as_tensor(t, dtype=x.dtype, device=x.device)
    t = t.to(dtype=x.dtype, device=x.device)
    shape = tuple(t.shape)
    lead = tuple(x.shape[:-1])
    while shape and shape[-1] == 1 and (len(shape) > len(lead) or shape != lead[: len(shape)]):
        shape = shape[:-1]
    if len(shape) > len(lead) or shape != lead[: len(shape)]:
        raise ValueError(
            f"t must be a scalar or have shape (B,) matching the leading dims of x {tuple(x.shape)}; "
            f"got {tuple(t.shape)}"
        )
    return t.reshape(*shape, *([1] * (x.dim() - len(shape))))


def _check_same_shape(x: Tensor, y: Tensor, what: str = "x and y") -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what} must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")


def _safe_sqrt(sq: Tensor) -> Tensor:
    """``sqrt(sq)`` with gradient 0 (not NaN/inf) where ``sq == 0``."""
    pos = sq > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def _dot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(-1, keepdim=True)


class Manifold:
    """Interface shared by all manifolds (see the module docstring for the contract of each method)."""

    #: Short name used in configs and error messages.
    name: str = "manifold"

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """Geodesic from ``x0`` (t = 0) to ``x1`` (t = 1). ``x0, x1: (B, ..., D)``, ``t``: scalar or ``(B,)``."""
        _check_same_shape(x0, x1, "x0 and x1")
        return self.exp(x0, _expand_t(t, x0) * self.log(x0, x1))

    def velocity(self, x_t: Tensor, x1: Tensor, t: Tensor | float, t_eps: float = T_EPS) -> Tensor:
        """Conditional flow-matching velocity ``log_{x_t}(x1) / (1 − t)`` with ``1 − t ≥ t_eps``.

        ``x_t, x1: (B, ..., D)``; ``t``: scalar or ``(B,)``. Returns a tangent vector at ``x_t`` of shape ``x_t.shape``.
        """
        _check_same_shape(x_t, x1, "x_t and x1")
        one_minus_t = (1.0 - _expand_t(t, x_t)).clamp_min(t_eps)
        return self.log(x_t, x1) / one_minus_t

    def log(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def exp(self, x: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def project(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def proj_tangent(self, x: Tensor, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sq_dist(self, x: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Geodesic distance, reduced over the manifold's own dims (gradient finite at ``x == y``)."""
        return _safe_sqrt(self.sq_dist(x, y))

    def random_projected_normal(
        self,
        shape: Sequence[int] | int,
        std: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw ``N(0, std² I)`` of the full tensor ``shape`` (last dim included) and project it onto the manifold."""
        x = torch.randn(_as_shape(shape), generator=generator, dtype=dtype) * std
        return self.project(x.to(device) if device is not None else x)


class Euclidean(Manifold):
    """Flat space ``R^dim`` on the last dimension. ``dim=None`` accepts any size (no shape check)."""

    name = "euclidean"

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and int(dim) <= 0:
            raise ValueError(f"Euclidean dim must be positive; got {dim}")
        self.dim = None if dim is None else int(dim)

    def __repr__(self) -> str:
        return f"Euclidean(dim={self.dim})"

    def _check(self, x: Tensor, what: str = "x") -> None:
        if self.dim is not None and (x.dim() == 0 or x.shape[-1] != self.dim):
            raise ValueError(f"{what} must have last dimension {self.dim}; got shape {tuple(x.shape)}")

    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """``(1 − t) x0 + t x1``."""
        _check_same_shape(x0, x1, "x0 and x1")
        self._check(x0, "x0")
        t = _expand_t(t, x0)
        return x0 + t * (x1 - x0)

    def log(self, x: Tensor, y: Tensor) -> Tensor:
        """``y − x``."""
        _check_same_shape(x, y)
        self._check(x)
        return y - x

    def exp(self, x: Tensor, v: Tensor) -> Tensor:
        """``x + v``."""
        _check_same_shape(x, v, "x and v")
        self._check(x)
        return x + v

    def project(self, x: Tensor) -> Tensor:
        """Identity."""
        self._check(x)
        return x

    def proj_tangent(self, x: Tensor, v: Tensor) -> Tensor:
        """Identity on ``v``."""
        _check_same_shape(x, v, "x and v")
        return v

    def sq_dist(self, x: Tensor, y: Tensor) -> Tensor:
        """``‖x − y‖²`` over the last dim: ``(..., D) → (...)``."""
        _check_same_shape(x, y)
        self._check(x)
        return (x - y).pow(2).sum(-1)


class Sphere(Manifold):
    """Unit sphere ``S^{dim−1}`` in ``R^dim`` on the last dimension, any leading batch dims.

    ``dim=None`` accepts any last-dimension size.
    """

    name = "sphere"

    def __init__(self, dim: int | None = None) -> None:
        if dim is not None and int(dim) <= 0:
            raise ValueError(f"Sphere ambient dim must be positive; got {dim}")
        self.dim = None if dim is None else int(dim)

    def __repr__(self) -> str:
        return f"Sphere(dim={self.dim})"

    def _check(self, x: Tensor, what: str = "x") -> None:
        if x.dim() == 0 or (self.dim is not None and x.shape[-1] != self.dim):
            raise ValueError(f"{what} must have last dimension {self.dim}; got shape {tuple(x.shape)}")

    # ---------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _fallback_direction(x: Tensor) -> Tensor:
        """A unit tangent vector at ``x`` chosen deterministically (used for antipodal pairs): the tangent part
        of the coordinate axis on which ``|x|`` is smallest. Zero on the 0-sphere."""
        k = x.abs().argmin(dim=-1, keepdim=True)
        e = torch.zeros_like(x).scatter_(-1, k, 1.0)
        w = e - torch.gather(x, -1, k) * x
        return w / _safe_sqrt(_dot(w, w)).clamp_min(torch.finfo(x.dtype).tiny)

    def _angle_parts(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c, u, s²)`` with ``c = <x, y>``, ``u = y − c x`` (the tangent part of ``y`` at ``x``) and
        ``s² = ‖u‖²`` (keepdim), written through ``y − x`` so that ``x == y`` gives exactly ``u = 0``, ``c = 1``
        (for unit ``x``: ``c = 1 − ‖y − x‖²/2``). A final tangent projection removes the normal round-off that
        the ``θ / s`` factor would amplify near antipodal pairs."""
        diff = y - x
        half_d2 = _dot(diff, diff) / 2
        c = 1.0 - half_d2
        u = diff + half_d2 * x
        u = u - _dot(x, u) * x
        return c, u, _dot(u, u)

    # ------------------------------------------------------------------------------------- interface
    def log(self, x: Tensor, y: Tensor) -> Tensor:
        """``θ · u/‖u‖`` with ``u = y − <x,y> x`` and ``θ = atan2(‖u‖, <x,y>)``.

        ``x, y: (..., dim)`` on the sphere → ``(..., dim)`` tangent at ``x``. Exactly 0 for ``x == y`` (with finite
        gradients); antipodal pairs: length π along :meth:`_fallback_direction`; 0 on the 0-sphere.
        """
        _check_same_shape(x, y)
        self._check(x)
        if x.shape[-1] == 1:  # S^0 = {-1, +1}: the tangent space is {0}
            return torch.zeros_like(x)
        c, u, s2 = self._angle_parts(x, y)
        small = s2 < _SMALL_SQ
        near = small & (c > 0)  # nearly identical: θ/sin θ = 1 + s²/6 + O(s⁴)
        anti = small & (c <= 0)  # nearly antipodal: the direction of u is unreliable
        s_safe = torch.sqrt(torch.where(small, torch.ones_like(s2), s2))
        factor = torch.where(near, 1.0 + s2 / 6.0, torch.atan2(s_safe, c) / s_safe)
        theta_anti = torch.atan2(_safe_sqrt(s2), c)
        return torch.where(anti, theta_anti * self._fallback_direction(x), factor * u)

    def exp(self, x: Tensor, v: Tensor) -> Tensor:
        """``cos‖v‖ x + sin‖v‖ v/‖v‖`` (renormalized to unit length against round-off).

        ``x: (..., dim)`` on the sphere, ``v: (..., dim)`` tangent at ``x`` (not projected here).
        """
        _check_same_shape(x, v, "x and v")
        self._check(x)
        n2 = _dot(v, v)
        small = n2 < _SMALL_SQ
        n_safe = torch.sqrt(torch.where(small, torch.ones_like(n2), n2))
        cos = torch.where(small, 1.0 - n2 / 2.0, torch.cos(n_safe))
        sinc = torch.where(small, 1.0 - n2 / 6.0, torch.sin(n_safe) / n_safe)
        return self.project(cos * x + sinc * v)

    def project(self, x: Tensor) -> Tensor:
        """``x / ‖x‖`` on the last dim; an exactly-zero vector maps to the first basis vector."""
        self._check(x)
        n2 = _dot(x, x)
        zero = n2 == 0
        n = torch.sqrt(torch.where(zero, torch.ones_like(n2), n2))
        e0 = torch.zeros_like(x)
        e0[..., 0] = 1.0
        return torch.where(zero, e0, x / n)

    def proj_tangent(self, x: Tensor, v: Tensor) -> Tensor:
        """``v − <x, v> x``."""
        _check_same_shape(x, v, "x and v")
        self._check(x)
        return v - _dot(x, v) * x

    def sq_dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Squared great-circle distance ``atan2(‖u‖, <x,y>)²``: ``(..., dim) → (...)``."""
        _check_same_shape(x, y)
        self._check(x)
        c, _, s2 = self._angle_parts(x, y)
        near = (s2 < _SMALL_SQ) & (c > 0)  # θ² = s² + s⁴/3 + O(s⁶)
        theta = torch.atan2(_safe_sqrt(torch.where(near, torch.ones_like(s2), s2)), c)
        return torch.where(near, s2 * (1.0 + s2 / 3.0), theta.pow(2)).squeeze(-1)


@dataclass(frozen=True)
class Block:
    """One factor of a :class:`ProductManifold`: a slice ``[start, start + size)`` of the flat vector.

    ``kind="sphere"``: the slice is ``n_spheres`` consecutive unit vectors of ``sphere_dim`` entries each;
    ``kind="euclidean"``: ``size`` free coordinates.
    """

    name: str
    kind: Literal["sphere", "euclidean"]
    size: int
    n_spheres: int = 0
    sphere_dim: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("sphere", "euclidean"):
            raise ValueError(f"block kind must be 'sphere' or 'euclidean'; got {self.kind!r}")
        if self.size <= 0:
            raise ValueError(f"block {self.name!r} must have a positive size; got {self.size}")
        if self.kind == "sphere" and (self.n_spheres <= 0 or self.n_spheres * self.sphere_dim != self.size):
            raise ValueError(
                f"sphere block {self.name!r} needs n_spheres * sphere_dim == size; "
                f"got {self.n_spheres} * {self.sphere_dim} != {self.size}"
            )

    @classmethod
    def sphere(cls, name: str, n_spheres: int, sphere_dim: int) -> Block:
        """``n_spheres`` unit spheres ``S^{sphere_dim − 1}``."""
        return cls(name, "sphere", int(n_spheres) * int(sphere_dim), int(n_spheres), int(sphere_dim))

    @classmethod
    def euclidean(cls, name: str, size: int) -> Block:
        """``R^size``."""
        return cls(name, "euclidean", int(size))


class ProductManifold(Manifold):
    """Product of :class:`Block` s acting on flat ``[..., dim]`` tensors (typically ``[B, dim]``).

    Each method cuts the flat vector into blocks, applies the block's geometry on views reshaped to
    ``[..., n_spheres, sphere_dim]`` (spheres) or ``[..., size]`` (Euclidean), and concatenates the results.
    The loop runs over the (few) blocks, never over samples.
    """

    name = "product"

    def __init__(self, blocks: Sequence[Block]) -> None:
        blocks = tuple(blocks)
        if not blocks:
            raise ValueError("a product manifold needs at least one block")
        names = [b.name for b in blocks]
        if len(set(names)) != len(names):
            raise ValueError(f"block names must be unique; got {names}")
        self.blocks: tuple[Block, ...] = blocks
        starts, pos = [], 0
        for b in blocks:
            starts.append(pos)
            pos += b.size
        self.starts: tuple[int, ...] = tuple(starts)
        self.dim: int = pos
        self._sphere = Sphere()
        self._euclid = Euclidean()

    def __repr__(self) -> str:
        parts = [
            f"{b.name}: {b.n_spheres}×S^{b.sphere_dim - 1}" if b.kind == "sphere" else f"{b.name}: R^{b.size}"
            for b in self.blocks
        ]
        return f"ProductManifold(dim={self.dim}; " + ", ".join(parts) + ")"

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def slices(self) -> dict[str, slice]:
        """``name -> slice`` of each block in the flat vector."""
        return {b.name: slice(s, s + b.size) for b, s in zip(self.blocks, self.starts)}

    def sphere_mask(self) -> Tensor:
        """Bool ``(dim,)``: True on coordinates that belong to a sphere block."""
        m = torch.zeros(self.dim, dtype=torch.bool)
        for b, s in zip(self.blocks, self.starts):
            if b.kind == "sphere":
                m[s : s + b.size] = True
        return m

    def _check(self, x: Tensor, what: str = "x") -> None:
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"{what} must have shape (..., {self.dim}) for {self!r}; got {tuple(x.shape)}")

    def _view(self, x: Tensor, b: Block, s: int) -> Tensor:
        part = x[..., s : s + b.size]
        return part.reshape(*x.shape[:-1], b.n_spheres, b.sphere_dim) if b.kind == "sphere" else part

    def _map(self, fn_name: str, *args: Tensor) -> Tensor:
        """Apply ``Sphere.fn_name`` / ``Euclidean.fn_name`` block-wise to ``args`` (all ``[..., dim]``)."""
        lead = args[0].shape[:-1]
        outs = []
        for b, s in zip(self.blocks, self.starts):
            views = [self._view(a, b, s) for a in args]
            man = self._sphere if b.kind == "sphere" else self._euclid
            outs.append(getattr(man, fn_name)(*views).reshape(*lead, b.size))
        return torch.cat(outs, dim=-1)

    # ------------------------------------------------------------------------------------- interface
    def interpolate(self, x0: Tensor, x1: Tensor, t: Tensor | float) -> Tensor:
        """Block-wise geodesic interpolation. ``x0, x1: (B, dim)``, ``t``: scalar or ``(B,)`` → ``(B, dim)``."""
        _check_same_shape(x0, x1, "x0 and x1")
        self._check(x0, "x0")
        _expand_t(t, x0)  # validate once against the flat shape
        lead = x0.shape[:-1]
        outs = []
        for b, s in zip(self.blocks, self.starts):
            a, c = self._view(x0, b, s), self._view(x1, b, s)
            man = self._sphere if b.kind == "sphere" else self._euclid
            outs.append(man.interpolate(a, c, t).reshape(*lead, b.size))
        return torch.cat(outs, dim=-1)

    def log(self, x: Tensor, y: Tensor) -> Tensor:
        """Block-wise log map: ``(B, dim), (B, dim) → (B, dim)``."""
        _check_same_shape(x, y)
        self._check(x)
        return self._map("log", x, y)

    def exp(self, x: Tensor, v: Tensor) -> Tensor:
        """Block-wise exponential map: ``(B, dim), (B, dim) → (B, dim)``."""
        _check_same_shape(x, v, "x and v")
        self._check(x)
        return self._map("exp", x, v)

    def project(self, x: Tensor) -> Tensor:
        """Normalize every sphere of every sphere block; Euclidean blocks unchanged."""
        self._check(x)
        return self._map("project", x)

    def proj_tangent(self, x: Tensor, v: Tensor) -> Tensor:
        """Block-wise tangent projection at ``x``."""
        _check_same_shape(x, v, "x and v")
        self._check(x)
        return self._map("proj_tangent", x, v)

    def sq_dist(self, x: Tensor, y: Tensor) -> Tensor:
        """Sum of squared block distances: ``(..., dim) → (...)``."""
        _check_same_shape(x, y)
        self._check(x)
        total = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        for b, s in zip(self.blocks, self.starts):
            xv, yv = self._view(x, b, s), self._view(y, b, s)
            if b.kind == "sphere":
                total = total + self._sphere.sq_dist(xv, yv).sum(-1)
            else:
                total = total + self._euclid.sq_dist(xv, yv)
        return total

    def block_dists(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Per-block geodesic distances ``{name: (...)}`` (diagnostics)."""
        _check_same_shape(x, y)
        self._check(x)
        out = {}
        for b, s in zip(self.blocks, self.starts):
            xv, yv = self._view(x, b, s), self._view(y, b, s)
            sq = self._sphere.sq_dist(xv, yv).sum(-1) if b.kind == "sphere" else self._euclid.sq_dist(xv, yv)
            out[b.name] = _safe_sqrt(sq)
        return out


def product_manifold_for(spec: NetworkSpec) -> ProductManifold:
    """The canonical-coordinate manifold of ``spec`` (``docs/INTERFACES.md``), total dim ``D + 1``.

    In spec order: for hidden layers ``i < L − 1`` the weight ``[n_{i+1}, n_i]`` is ``n_{i+1}`` spheres
    ``S^{n_i − 1}`` (one per row) and the bias is Euclidean; the last weight matrix is ONE sphere
    ``S^{n_L n_{L−1} − 1}`` (unit Frobenius norm) and its bias Euclidean; then one Euclidean ``log_scale``.
    """
    blocks: list[Block] = []
    last = spec.num_layers - 1
    for i in range(spec.num_layers):
        n_out, n_in = spec.shapes[f"layers.{i}.weight"]
        if i < last:
            blocks.append(Block.sphere(f"layers.{i}.weight", n_out, n_in))
        else:
            blocks.append(Block.sphere(f"layers.{i}.weight", 1, n_out * n_in))
        blocks.append(Block.euclidean(f"layers.{i}.bias", n_out))
    blocks.append(Block.euclidean("log_scale", 1))
    man = ProductManifold(blocks)
    if man.dim != spec.num_params + 1:  # pragma: no cover - internal consistency
        raise RuntimeError(f"canonical manifold has dim {man.dim}, expected {spec.num_params + 1}")
    return man


def euclidean_for(spec: NetworkSpec) -> Euclidean:
    """``R^D`` for the raw flat weights of ``spec`` (``D = spec.num_params``)."""
    return Euclidean(spec.num_params)
