"""Batched manifolds: closed forms, float64 round trips, numerical stability and gradients."""

import math

import pytest
import torch

from metaflow_ws.geometry import (
    T_EPS,
    Block,
    Euclidean,
    ProductManifold,
    Sphere,
    euclidean_for,
    product_manifold_for,
)
from metaflow_ws.nets import NetworkSpec

F64 = torch.float64
SPEC = NetworkSpec((5, 4, 3, 2))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Every geometry with a batch shape it acts on; generic properties are checked for all of them.
CASES = {
    "euclidean": (Euclidean(7), (6, 7)),
    "sphere": (Sphere(5), (6, 3, 5)),
    "product": (product_manifold_for(SPEC), (6, SPEC.num_params + 1)),
    "euclidean_for": (euclidean_for(SPEC), (6, SPEC.num_params)),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    man, shape = CASES[request.param]
    x = man.random_projected_normal(shape, 0.7, generator=_gen(0), dtype=F64)
    y = man.random_projected_normal(shape, 0.7, generator=_gen(1), dtype=F64)
    return man, x, y


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------------------- closed forms
def test_sphere_distance_is_arccos_of_dot():
    s = Sphere(6)
    x = _unit(torch.randn(50, 6, generator=_gen(2), dtype=F64))
    y = _unit(torch.randn(50, 6, generator=_gen(3), dtype=F64))
    ref = torch.arccos((x * y).sum(-1).clamp(-1, 1))
    torch.testing.assert_close(s.dist(x, y), ref, rtol=1e-12, atol=1e-12)
    # tiny and near-π angles, where arccos is inaccurate: atan2 form matches the known angle
    for theta in (1e-9, 1e-5, 0.3, math.pi - 1e-6):
        a = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
        b = torch.tensor([math.cos(theta), math.sin(theta), 0.0], dtype=F64)
        assert abs(Sphere().dist(a, b).item() - theta) < 1e-12 * max(1.0, theta)


def test_sphere_interpolation_endpoints_and_midpoint():
    s = Sphere(3)
    e1 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    e2 = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    torch.testing.assert_close(s.interpolate(e1, e2, 0.0), e1)
    torch.testing.assert_close(s.interpolate(e1, e2, 1.0), e2)
    mid = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64) / math.sqrt(2)
    torch.testing.assert_close(s.interpolate(e1, e2, torch.tensor([0.5], dtype=F64)), mid, rtol=0, atol=1e-15)
    # constant speed along the great circle
    t = torch.tensor([0.25], dtype=F64)
    ref = torch.tensor([[math.cos(math.pi / 8), math.sin(math.pi / 8), 0.0]], dtype=F64)
    torch.testing.assert_close(s.interpolate(e1, e2, t), ref, rtol=0, atol=1e-15)


def test_euclidean_closed_forms():
    e = Euclidean(3)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    y = torch.tensor([[3.0, 2.0, -1.0]], dtype=F64)
    torch.testing.assert_close(e.interpolate(x, y, 0.25), x + 0.25 * (y - x))
    torch.testing.assert_close(e.velocity(x, y, torch.tensor([0.5], dtype=F64)), 2 * (y - x))
    torch.testing.assert_close(e.dist(x, y), torch.tensor([math.sqrt(20.0)], dtype=F64))


def test_product_layout_matches_interfaces():
    man = product_manifold_for(SPEC)
    assert man.dim == SPEC.num_params + 1
    got = [(b.name, b.kind, b.n_spheres, b.sphere_dim, b.size) for b in man.blocks]
    assert got == [
        ("layers.0.weight", "sphere", 4, 5, 20),
        ("layers.0.bias", "euclidean", 0, 0, 4),
        ("layers.1.weight", "sphere", 3, 4, 12),
        ("layers.1.bias", "euclidean", 0, 0, 3),
        ("layers.2.weight", "sphere", 1, 6, 6),
        ("layers.2.bias", "euclidean", 0, 0, 2),
        ("log_scale", "euclidean", 0, 0, 1),
    ]
    # blocks follow spec order, with the trailing log_scale
    for name, (a, b) in SPEC.offsets.items():
        assert man.slices[name] == slice(a, b)
    assert man.slices["log_scale"] == slice(SPEC.num_params, SPEC.num_params + 1)
    assert int(man.sphere_mask().sum()) == 20 + 12 + 6
    assert euclidean_for(SPEC).dim == SPEC.num_params


def test_product_projection_and_distance_decompose():
    man = product_manifold_for(SPEC)
    x = man.random_projected_normal((4, man.dim), 0.3, generator=_gen(4), dtype=F64)
    y = man.random_projected_normal((4, man.dim), 0.3, generator=_gen(5), dtype=F64)
    p = SPEC.unflatten(x[:, : SPEC.num_params])
    torch.testing.assert_close(p["layers.0.weight"].norm(dim=-1), torch.ones(4, 4, dtype=F64))
    torch.testing.assert_close(p["layers.1.weight"].norm(dim=-1), torch.ones(4, 3, dtype=F64))
    torch.testing.assert_close(p["layers.2.weight"].flatten(1).norm(dim=-1), torch.ones(4, dtype=F64))
    # distance = sqrt(sum of squared block distances), each from the closed form
    sq = torch.zeros(4, dtype=F64)
    for b, s in zip(man.blocks, man.starts):
        xa, ya = x[:, s : s + b.size], y[:, s : s + b.size]
        if b.kind == "sphere":
            xa, ya = xa.reshape(4, b.n_spheres, b.sphere_dim), ya.reshape(4, b.n_spheres, b.sphere_dim)
            sq += torch.arccos((xa * ya).sum(-1).clamp(-1, 1)).pow(2).sum(-1)
        else:
            sq += (xa - ya).pow(2).sum(-1)
    torch.testing.assert_close(man.dist(x, y), sq.sqrt(), rtol=1e-12, atol=1e-12)
    assert set(man.block_dists(x, y)) == {b.name for b in man.blocks}


# --------------------------------------------------------------------------------- generic properties
def test_points_lie_on_manifold_and_projection_is_idempotent(case):
    man, x, _ = case
    torch.testing.assert_close(man.project(x), x, rtol=0, atol=1e-14)


def test_exp_log_round_trips(case):
    man, x, y = case
    v = man.log(x, y)
    torch.testing.assert_close(man.proj_tangent(x, v), v, rtol=0, atol=1e-12)
    torch.testing.assert_close(man.exp(x, v), y, rtol=0, atol=1e-12)
    # log ∘ exp on tangent vectors shorter than π
    w = man.proj_tangent(x, torch.randn(x.shape, generator=_gen(6), dtype=F64) * 0.2)
    torch.testing.assert_close(man.log(x, man.exp(x, w)), w, rtol=0, atol=1e-12)


def test_interpolation_endpoints_and_constant_speed(case):
    man, x, y = case
    b = x.shape[0]
    torch.testing.assert_close(man.interpolate(x, y, 0.0), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(man.interpolate(x, y, torch.ones(b, dtype=F64)), y, rtol=0, atol=1e-12)
    t = torch.linspace(0.1, 0.9, b, dtype=F64)
    xt = man.interpolate(x, y, t)
    torch.testing.assert_close(man.project(xt), xt, rtol=0, atol=1e-13)
    d, dt = man.dist(x, y), man.dist(x, xt)
    tt = t.reshape(-1, *([1] * (d.dim() - 1)))
    torch.testing.assert_close(dt, tt * d, rtol=1e-10, atol=1e-12)
    # t given as (B, 1) behaves like (B,)
    torch.testing.assert_close(man.interpolate(x, y, t[:, None]), xt)


def test_velocity_matches_finite_difference_of_geodesic(case):
    man, x, y = case
    b, h = x.shape[0], 1e-6
    t = torch.linspace(0.1, 0.8, b, dtype=F64)
    fd = (man.interpolate(x, y, t + h) - man.interpolate(x, y, t - h)) / (2 * h)
    u = man.velocity(man.interpolate(x, y, t), y, t)
    torch.testing.assert_close(u, fd, rtol=1e-6, atol=1e-7)


def test_identical_points_are_stable(case):
    man, x, _ = case
    x = x.clone().requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    v = man.log(x, y)
    assert torch.count_nonzero(v) == 0
    d = man.dist(x, y)
    assert torch.all(d == 0)
    (v.sum() + d.sum() + man.sq_dist(x, y).sum() + man.velocity(x, y, 0.3).sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    torch.testing.assert_close(man.exp(x.detach(), torch.zeros_like(x)), x.detach())


def test_velocity_near_t_one_is_finite(case):
    man, x, y = case
    b = x.shape[0]
    for t_val in (0.999999, 1.0):
        t = torch.full((b,), t_val, dtype=F64)
        xt = man.interpolate(x, y, t)
        u = man.velocity(xt, y, t)
        assert torch.isfinite(u).all()
    # at t = 1 − T_EPS/10 the clamp is active: |u| ≤ |log| / T_EPS
    t = torch.full((b,), 1 - T_EPS / 10, dtype=F64)
    xt = man.interpolate(x, y, t)
    torch.testing.assert_close(man.velocity(xt, y, t), man.log(xt, y) / T_EPS)


def test_gradients_are_finite_and_correct(case):
    man, x, y = case
    # gradcheck on a two-sample slice (float64); inputs are perturbed off the manifold, which the formulas allow
    x2, y2 = x[:2].clone().requires_grad_(True), y[:2].clone().requires_grad_(True)
    t = torch.tensor([0.3, 0.7], dtype=F64)
    assert torch.autograd.gradcheck(lambda a, c: man.log(a, c), (x2, y2))
    assert torch.autograd.gradcheck(lambda a, c: man.dist(a, c), (x2, y2))
    assert torch.autograd.gradcheck(lambda a, c: man.interpolate(a, c, t), (x2, y2))
    assert torch.autograd.gradcheck(lambda a, c: man.velocity(man.interpolate(a, c, t), c, t), (x2, y2))
    w = man.proj_tangent(x2.detach(), 0.3 * y2.detach()).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, v: man.exp(a, v), (x2, w))


# --------------------------------------------------------------------------------------- sphere edges
def test_sphere_gradcheck_at_identical_points():
    s = Sphere(4)
    y = _unit(torch.randn(2, 4, generator=_gen(7), dtype=F64))
    x = y.clone().requires_grad_(True)  # gradcheck perturbs x in place; y stays put
    assert torch.autograd.gradcheck(lambda a: s.log(a, y), (x,))
    assert torch.autograd.gradcheck(lambda a: s.log(y, a), (x,))
    assert torch.autograd.gradcheck(lambda a: s.sq_dist(a, y), (x,))
    assert torch.autograd.gradcheck(lambda v: s.exp(y, v), (torch.zeros(2, 4, dtype=F64, requires_grad=True),))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sphere_antipodal_points_are_finite(dtype):
    s = Sphere(5)
    x = _unit(torch.randn(8, 5, generator=_gen(8), dtype=dtype))
    noise = torch.randn(8, 5, generator=_gen(9), dtype=dtype)
    for y in (-x, s.project(-x + 1e-9 * noise), s.project(-x + 1e-3 * noise)):
        xx = x.clone().requires_grad_(True)
        v = s.log(xx, y)
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v.norm(dim=-1), s.dist(x, y), rtol=1e-4, atol=1e-4)
        assert torch.all(s.dist(x, y) > math.pi - 1e-2)
        torch.testing.assert_close(s.proj_tangent(x, v), v, rtol=0, atol=1e-5)
        (v.sum() + s.dist(xx, y).sum()).backward()
        assert torch.isfinite(xx.grad).all()
        mid = s.interpolate(x, y, 0.5)
        assert torch.isfinite(mid).all()
        torch.testing.assert_close(s.dist(x, mid), s.dist(x, y) / 2, rtol=1e-4, atol=1e-4)


def test_zero_sphere_is_static():
    s = Sphere(1)
    x = torch.tensor([[1.0], [-1.0]], dtype=F64)
    y = torch.tensor([[-1.0], [-1.0]], dtype=F64)
    assert torch.count_nonzero(s.log(x, y)) == 0
    torch.testing.assert_close(s.interpolate(x, y, 0.7), x)
    torch.testing.assert_close(s.dist(x, y), torch.tensor([math.pi, 0.0], dtype=F64))
    torch.testing.assert_close(s.project(torch.tensor([[-0.3], [2.0]], dtype=F64)), torch.tensor([[-1.0], [1.0]], dtype=F64))


def test_projection_of_zero_is_on_sphere():
    out = Sphere().project(torch.zeros(2, 3))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


# ------------------------------------------------------------------------------------- API & errors
def test_prior_is_reproducible_and_on_manifold():
    man = product_manifold_for(SPEC)
    a = man.random_projected_normal((3, man.dim), 0.1, generator=_gen(10))
    b = man.random_projected_normal((3, man.dim), 0.1, generator=_gen(10))
    assert torch.equal(a, b) and a.dtype == torch.float32
    torch.testing.assert_close(man.project(a), a)
    e = Euclidean().random_projected_normal(4, 2.0, generator=_gen(11), dtype=F64)
    assert e.shape == (4,)


def test_errors_name_expected_and_got():
    man = product_manifold_for(SPEC)
    x = torch.zeros(2, man.dim - 1)
    with pytest.raises(ValueError, match=rf"\(\.\.\., {man.dim}\).*got \(2, {man.dim - 1}\)"):
        man.project(x)
    with pytest.raises(ValueError, match="same shape"):
        man.log(torch.zeros(2, man.dim), torch.zeros(3, man.dim))
    with pytest.raises(ValueError, match=r"t must be .*got \(5,\)"):
        Euclidean().interpolate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(5))
    with pytest.raises(ValueError, match="last dimension 7"):
        Euclidean(7).log(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="n_spheres \\* sphere_dim"):
        Block("w", "sphere", 7, 2, 3)
    with pytest.raises(ValueError, match="unique"):
        ProductManifold([Block.euclidean("a", 1), Block.euclidean("a", 2)])


def test_no_python_loop_over_samples_scales():
    """A large batch runs in one vectorized pass (guards against per-sample loops sneaking in)."""
    man = product_manifold_for(NetworkSpec((30, 16, 16, 2)))
    x = man.random_projected_normal((2048, man.dim), 0.3, generator=_gen(12))
    y = man.random_projected_normal((2048, man.dim), 0.3, generator=_gen(13))
    t = torch.rand(2048, generator=_gen(14))
    out = man.velocity(man.interpolate(x, y, t), y, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
