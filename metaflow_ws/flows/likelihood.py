"""Log-likelihood of given weights under a flow: the probability-flow ODE integrated backwards with the
instantaneous change of variables.

What is computed
----------------
For a flow with velocity ``v(x, t)`` carrying the prior ``p0`` (t = 0) to the model ``p1`` (t = 1), the density
along a trajectory obeys ``d/dt log p_t(x_t) = −div v(x_t, t)``, so for given coordinates ``x1``::

    log p1(x1) = log p0(x0) − ∫_0^1 div v(x_t, t) dt,        x_t = the ODE solution through x1, run backwards.

*Discretization* — the sampler's uniform grid ``t_k = k/K`` (``K = steps``, ``SampleConfig(rho=1)``), run in
reverse: for ``k = K−1, …, 0`` the field is evaluated at the current point and the **left** time of the interval,
``x ← exp_x(−Δt · v(x, t_k))`` and ``Δ ← Δ + Δt · div v(x, t_k)`` (``Δt = 1/K``). The field is never evaluated
at ``t = 1``, where the x1-prediction velocity ``(x̂1 − x)/(1 − t)`` is singular, exactly as in
:func:`~metaflow_ws.flows.sampling.sample`; the last reverse step (``t_{K−1} = 1 − Δt``) has coefficient
``Δt/(1 − t) = 1`` like the sampler's first-order last step. As ``K → ∞`` this converges to the ODE's value
wherever the ODE is regular; at finite ``K`` it is the log-likelihood of the K-step discretized flow up to
O(Δt). ``log_prob = prior_log_prob − Δ``.

*Divergence* — ``estimator="exact"``: the trace of the Jacobian, from one vector–Jacobian product per
coordinate (``torch.func.vjp`` vmapped over chunks of basis vectors, all samples at once: ``dim`` backward
passes per step — for small networks); ``estimator="hutchinson"``: the unbiased estimate ``E[u^T J u]`` with
Rademacher probes ``u`` (``n_probes`` per step, fresh at every step; one backward pass each — for large
networks).

*Geometry* — Euclidean flow: ``R^D`` with Lebesgue measure, ``div v = tr J``. Normalized and Geometric flows
live on the product manifold of the canonical coordinates (unit spheres × R, ``docs/INTERFACES.md``): the
density is w.r.t. its Riemannian volume and the divergence is the Riemannian one,
``div_M v = tr(P J P) = tr(P J)`` with ``P`` the orthogonal projection onto the tangent space at ``x``
(block diagonal: ``I − x_s x_s^T`` per sphere, ``I`` on Euclidean coordinates) and ``J`` the ambient Jacobian
of the field (only its tangential derivatives enter, so any smooth extension off the manifold gives the same
value). Hutchinson probes are projected, ``u = P z``, so that ``E[u u^T] = P``. Reverse steps use the
exponential map. The field used is ``P v``: for the Geometric flow this is its own (tangent) velocity; the
**Normalized** flow's sampler runs a Euclidean path through the interior of the spheres, which has no density
on the manifold, so for it we evaluate the manifold ODE of its tangent-projected field — a model that shares
its vector field, not exactly the density of its sampler (its numbers are best read as scores).

*Prior* — Euclidean flow: ``N(0, σ²I_D)`` exactly (``σ`` = ``FlowConfig.prior_std``, the zoo's init).
Canonical flows: the sampler's prior is ``N(0, σ²I)`` pushed through canonicalization, whose density on the
manifold has no closed form (the scale orbits couple consecutive layers). We use the *reference* product
density: uniform on every sphere ``S^{n−1}`` (``−log area(S^{n−1})``, ``area = 2π^{n/2}/Γ(n/2)``; on ``S^0`` the
counting measure, ``−log 2``) — exact for the first layer's rows, which are normalized isotropic Gaussians — times
an independent Gaussian per Euclidean coordinate (biases, ``log_scale``) whose mean and variance match, per
block, 1024 draws of the true pushed-forward prior (fixed seed 0, so the density is deterministic).

Likelihoods of canonical flows are densities of canonical coordinates (one point per scale orbit), so they
cannot be compared with those of a Euclidean flow in raw weight space; :attr:`LikelihoodResult.dim` gives
the intrinsic dimension for per-dimension normalization.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.func import vjp, vmap

from metaflow_ws.flows.flow import WeightFlow
from metaflow_ws.geometry import Euclidean, Manifold, ProductManifold

__all__ = [
    "ESTIMATORS",
    "LikelihoodResult",
    "default_batch_size",
    "divergence",
    "gaussian_log_prob",
    "intrinsic_dim",
    "log_likelihood",
    "ode_log_likelihood",
    "prior_log_prob",
    "sphere_log_area",
]

ESTIMATORS = ("exact", "hutchinson")
Estimator = Literal["exact", "hutchinson"]
VelocityField = Callable[[Tensor, Tensor], Tensor]

#: prior draws used to fit the Gaussian of the Euclidean coordinates of the canonical reference prior
_PRIOR_MC = 1024


@dataclass(frozen=True, eq=False)
class LikelihoodResult:
    """Log-likelihoods of B points under a flow.

    ``log_prob``: ``(B,)`` = ``prior_log_prob − divergence_integral``; ``prior_log_prob``: ``(B,)`` log p0 of the
    reverse-time end points ``x0``: ``(B, dim)``; ``divergence_integral``: ``(B,)`` the discretized
    ``∫_0^1 div v dt``; ``dim``: intrinsic dimension (``D`` Euclidean; ``Σ (n−1)`` over spheres plus the Euclidean
    coordinates on a product manifold); ``steps``, ``estimator``, ``n_probes`` as used.
    """

    log_prob: Tensor
    prior_log_prob: Tensor
    divergence_integral: Tensor
    x0: Tensor
    dim: int
    steps: int
    estimator: str
    n_probes: int

    @property
    def nats_per_dim(self) -> Tensor:
        """``(B,)`` ``−log_prob / dim``."""
        return -self.log_prob / self.dim


# --------------------------------------------------------------------------------------------- geometry
def sphere_log_area(n: int) -> float:
    """``log`` of the area of the unit sphere ``S^{n−1}`` in ``R^n`` (``2π^{n/2}/Γ(n/2)``; ``log 2`` for n = 1)."""
    if n < 1:
        raise ValueError(f"sphere ambient dimension must be ≥ 1; got {n}")
    return math.log(2.0) + 0.5 * n * math.log(math.pi) - math.lgamma(0.5 * n)


def intrinsic_dim(manifold: Manifold, ambient: int) -> int:
    """Dimension of ``manifold`` embedded in ``R^ambient`` (spheres lose one dimension each)."""
    if isinstance(manifold, ProductManifold):
        return sum(b.n_spheres * (b.sphere_dim - 1) if b.kind == "sphere" else b.size for b in manifold.blocks)
    return ambient


def gaussian_log_prob(x: Tensor, std: float | Tensor, mean: float | Tensor = 0.0) -> Tensor:
    """``Σ_j log N(x_j; mean_j, std_j²)`` over the last dim: ``(B, n) → (B,)``; ``std``/``mean`` scalars or ``(n,)``."""
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).expand(x.shape[-1])
    z = (x - torch.as_tensor(mean, dtype=x.dtype, device=x.device)) / std_t
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1) - torch.log(std_t).sum()


def _projector_columns(manifold: Manifold, x: Tensor, idx: Tensor) -> Tensor:
    """``P(x) e_i`` for the basis vectors ``i ∈ idx``: ``(len(idx), B, dim)``."""
    b, d = x.shape
    e = torch.zeros(len(idx), b, d, dtype=x.dtype, device=x.device)
    e[torch.arange(len(idx)), :, idx] = 1.0
    if isinstance(manifold, Euclidean):
        return e
    return manifold.proj_tangent(x.unsqueeze(0).expand_as(e).reshape(-1, d), e.reshape(-1, d)).reshape(e.shape)


def divergence(
    field: Callable[[Tensor], Tensor],
    x: Tensor,
    manifold: Manifold,
    *,
    estimator: Estimator = "exact",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """``(field(x), div field(x))`` for a batch of independent samples.

    ``field``: ``(B, dim) → (B, dim)`` acting on every sample separately (no mixing across the batch);
    ``x``: ``(B, dim)`` on ``manifold``. The divergence is the Riemannian one, ``tr(P J)`` (``P = I`` on a
    Euclidean space), exact (``dim`` vector–Jacobian products, ``chunk_size`` basis vectors at a time) or by
    Hutchinson with ``n_probes`` projected Rademacher probes. Returns ``(B, dim)`` and ``(B,)``; both detached.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown divergence estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
    if x.dim() != 2:
        raise ValueError(f"x must be (B, dim); got {tuple(x.shape)}")
    if n_probes < 1 or chunk_size < 1:
        raise ValueError(f"n_probes and chunk_size must be ≥ 1; got {n_probes}, {chunk_size}")
    b, d = x.shape
    with torch.enable_grad():
        v, vjp_fn = vjp(field, x.detach())
        batched = vmap(vjp_fn)
        div = torch.zeros(b, dtype=x.dtype, device=x.device)
        if estimator == "exact":
            for s in range(0, d, chunk_size):
                idx = torch.arange(s, min(s + chunk_size, d), device=x.device)
                (rows,) = batched(_projector_columns(manifold, x, idx))  # [c, B, dim]: (P e_i)^T J
                div = div + rows[torch.arange(len(idx)), :, idx].sum(0)
        else:
            for s in range(0, n_probes, chunk_size):
                c = min(chunk_size, n_probes - s)
                z = torch.randint(0, 2, (c, b, d), generator=generator, dtype=torch.int64).to(x.device, x.dtype) * 2 - 1
                u = z if isinstance(manifold, Euclidean) else manifold.proj_tangent(
                    x.unsqueeze(0).expand_as(z).reshape(-1, d), z.reshape(-1, d)).reshape(z.shape)
                (rows,) = batched(u)  # [c, B, dim]: u^T J
                div = div + (rows * u).sum(-1).sum(0)
            div = div / n_probes
    return v.detach(), div.detach()


# ------------------------------------------------------------------------------------------------ ODE
@torch.no_grad()
def ode_log_likelihood(
    velocity: VelocityField,
    x1: Tensor,
    *,
    manifold: Manifold,
    prior_log_prob: Callable[[Tensor], Tensor],
    steps: int = 64,
    estimator: Estimator = "exact",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> LikelihoodResult:
    """Log-density of ``x1: (B, dim)`` under the flow of ``velocity(x, t) -> (B, dim)`` (``t: (B,)``) from the
    density ``prior_log_prob: (B, dim) -> (B,)``, on ``manifold`` (see the module docstring for the scheme).

    The field is projected onto the tangent space before use, so any ambient field defines a flow on the
    manifold. Samples must not interact inside ``velocity``.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1; got {steps}")
    if x1.dim() != 2:
        raise ValueError(f"x1 must be (B, dim); got {tuple(x1.shape)}")
    if not torch.isfinite(x1).all():
        raise ValueError("x1 contains NaN/inf coordinates")
    euclid = isinstance(manifold, Euclidean)
    x = x1 if euclid else manifold.project(x1)
    b, d = x.shape
    dt = 1.0 / steps
    integral = torch.zeros(b, dtype=x.dtype, device=x.device)
    for k in range(steps - 1, -1, -1):
        t = torch.full((b,), k * dt, dtype=x.dtype, device=x.device)

        def field(xc: Tensor, t: Tensor = t) -> Tensor:
            v = velocity(xc, t)
            return v if euclid else manifold.proj_tangent(xc, v)

        v, div = divergence(field, x, manifold, estimator=estimator, n_probes=n_probes, generator=generator,
                            chunk_size=chunk_size)
        integral = integral + dt * div
        x = x - dt * v if euclid else manifold.exp(x, -dt * v)
    prior = prior_log_prob(x)
    return LikelihoodResult(log_prob=prior - integral, prior_log_prob=prior, divergence_integral=integral, x0=x,
                            dim=intrinsic_dim(manifold, d), steps=steps, estimator=estimator,
                            n_probes=n_probes if estimator == "hutchinson" else 0)


# ---------------------------------------------------------------------------------------------- prior
def _canonical_prior_stats(flow: WeightFlow, man: ProductManifold, dtype: torch.dtype,
                           device: torch.device) -> dict[str, tuple[Tensor, Tensor]]:
    """Per Euclidean block: (mean, std) of ``_PRIOR_MC`` draws of the canonicalized prior (seed 0)."""
    g = torch.Generator().manual_seed(0)
    draws = flow.coords.sample_prior(_PRIOR_MC, flow.config.prior_std, generator=g, dtype=torch.float64)
    stats = {}
    for blk, sl in zip(man.blocks, man.slices.values()):
        if blk.kind == "euclidean":
            part = draws[:, sl]
            stats[blk.name] = (part.mean().to(device, dtype), part.std().clamp_min(1e-12).to(device, dtype))
    return stats


def prior_log_prob(flow: WeightFlow, x0: Tensor) -> Tensor:
    """``log p0(x0)`` of the flow's prior in its coordinates, ``(B, dim) → (B,)``: exactly ``N(0, σ²I)`` for the
    Euclidean flow; the reference product density (uniform spheres × fitted Gaussians, module docstring) for
    the canonical flows."""
    if not flow.coords.canonical:
        return gaussian_log_prob(x0, flow.config.prior_std)
    man = flow.data_manifold
    assert isinstance(man, ProductManifold)
    stats = _canonical_prior_stats(flow, man, x0.dtype, x0.device)
    total = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    for blk, sl in zip(man.blocks, man.slices.values()):
        if blk.kind == "sphere":
            total = total - blk.n_spheres * sphere_log_area(blk.sphere_dim)
        else:
            mean, std = stats[blk.name]
            total = total + gaussian_log_prob(x0[:, sl], std, mean)
    return total


# ----------------------------------------------------------------------------------------------- flows
def default_batch_size(flow: WeightFlow) -> int:
    """Networks per likelihood batch: one ``(B, E, d_edge)`` edge-feature tensor of at most
    ``AUTO_CHECKPOINT_ELEMENTS`` elements (at least 1, at most 256)."""
    from metaflow_ws.models.relational_transformer import AUTO_CHECKPOINT_ELEMENTS

    per_network = flow.field.topo.num_edges * flow.field.d_edge
    return int(min(256, max(1, AUTO_CHECKPOINT_ELEMENTS // per_network)))


def log_likelihood(
    flow: WeightFlow,
    params_or_coords: Mapping[str, Tensor] | Tensor,
    *,
    steps: int = 64,
    estimator: Estimator = "exact",
    n_probes: int = 1,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
    batch_size: int | None = None,
    chunk_size: int = 64,
) -> LikelihoodResult:
    """Log-likelihood of networks under ``flow`` (see the module docstring for exactly what is computed).

    ``params_or_coords``: a batch of networks ``{name: [B, ...]}`` (or a :class:`~metaflow_ws.io.Zoo`), encoded
    with ``flow.encode`` (aligned the way the flow's training zoo was, if it was — align them to the same
    reference first), or flow coordinates ``(B, flow.dim)``. ``cond``: ``(B, cond_dim)`` task embeddings of a
    conditional flow. ``batch_size`` networks are integrated at a time (default: as many as keep one
    edge-feature tensor of the vector field under ``AUTO_CHECKPOINT_ELEMENTS`` elements — the vjp keeps every
    layer's activations, so 160 networks of a 40-100-100-10 graph at once need over 24 GB); exact
    divergences cost ``dim`` backward passes per step and network, Hutchinson ``n_probes``.
    """
    from metaflow_ws.io.zoo import Zoo

    if isinstance(params_or_coords, Zoo):
        flow.check_spec(params_or_coords.spec, "zoo")
        params_or_coords = params_or_coords.params
    p = next(flow.parameters())
    if isinstance(params_or_coords, Tensor):
        x1 = params_or_coords.to(p.device, p.dtype)
        if x1.dim() != 2 or x1.shape[1] != flow.dim:
            raise ValueError(f"coordinates of this {flow.config.flow} flow must be (B, {flow.dim}); "
                             f"got {tuple(x1.shape)}")
    else:
        flow.spec.check(dict(params_or_coords))
        x1 = flow.encode({k: v.to(p.device, p.dtype) for k, v in params_or_coords.items()})
    if cond is not None and cond.shape[0] != x1.shape[0]:
        raise ValueError(f"cond must hold one embedding per network ({x1.shape[0]}); got {tuple(cond.shape)}")
    if batch_size is None:
        batch_size = default_batch_size(flow)
    elif batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1; got {batch_size}")
    flow.eval()
    man = flow.data_manifold
    results = []
    for s in range(0, x1.shape[0], batch_size):
        c = None if cond is None else cond[s : s + batch_size]

        def velocity(x: Tensor, t: Tensor, c: Tensor | None = c) -> Tensor:
            return flow.velocity(x, t, c)

        results.append(ode_log_likelihood(velocity, x1[s : s + batch_size], manifold=man,
                                          prior_log_prob=lambda x0: prior_log_prob(flow, x0), steps=steps,
                                          estimator=estimator, n_probes=n_probes, generator=generator,
                                          chunk_size=chunk_size))
    r0 = results[0]
    return LikelihoodResult(
        log_prob=torch.cat([r.log_prob for r in results]),
        prior_log_prob=torch.cat([r.prior_log_prob for r in results]),
        divergence_integral=torch.cat([r.divergence_integral for r in results]),
        x0=torch.cat([r.x0 for r in results]),
        dim=r0.dim, steps=steps, estimator=r0.estimator, n_probes=r0.n_probes,
    )
