"""Log-likelihood under flows (probability-flow ODE + change of variables) and likelihood-based detection."""

from __future__ import annotations

import math

import pytest
import torch

from metaflow_ws.evaluation.detection import auroc, corrupt_noise, corrupt_row_permutation, midranks, random_init
from metaflow_ws.flows import FLOWS, FlowConfig, WeightFlow
from metaflow_ws.flows.likelihood import (
    divergence,
    gaussian_log_prob,
    intrinsic_dim,
    log_likelihood,
    ode_log_likelihood,
    prior_log_prob,
    sphere_log_area,
)
from metaflow_ws.geometry import Block, Euclidean, ProductManifold
from metaflow_ws.nets import NetworkSpec

D64 = torch.float64


def _extrapolated(run, k: int):
    """Richardson extrapolation of a first-order scheme: 2·L(2K) − L(K) (error O(1/K²)); returns (value, x0)."""
    coarse, fine = run(k), run(2 * k)
    return 2 * fine.log_prob - coarse.log_prob, 2 * fine.x0 - coarse.x0


def _linear_matrix(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.6 * torch.randn(d, d, generator=g, dtype=D64)


# ------------------------------------------------------------------------------------- Euclidean, exact
def test_linear_field_matches_its_discrete_flow_map_exactly():
    """v = A x: the reverse scheme maps x1 to (I − A/K)^K x1 and the divergence is tr A at every step."""
    d, k = 4, 16
    a = _linear_matrix(d)
    x1 = torch.randn(6, d, generator=torch.Generator().manual_seed(1), dtype=D64)
    res = ode_log_likelihood(lambda x, t: x @ a.T, x1, manifold=Euclidean(d),
                             prior_log_prob=lambda x0: gaussian_log_prob(x0, 0.7), steps=k)
    step = torch.eye(d, dtype=D64) - a / k
    x0 = x1 @ torch.linalg.matrix_power(step, k).T
    torch.testing.assert_close(res.x0, x0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.divergence_integral, torch.full((6,), float(torch.trace(a)), dtype=D64))
    expected = torch.distributions.Normal(torch.tensor(0.0, dtype=D64), torch.tensor(0.7, dtype=D64)).log_prob(x0).sum(-1) - torch.trace(a)
    torch.testing.assert_close(res.log_prob, expected, rtol=1e-12, atol=1e-10)


def test_linear_field_converges_to_the_continuous_closed_form():
    """Flow map exp(A): log p1(x1) = log p0(exp(−A) x1) − tr A."""
    d = 3
    a = _linear_matrix(d, seed=2)
    x1 = torch.randn(5, d, generator=torch.Generator().manual_seed(3), dtype=D64)
    log_prob, _ = _extrapolated(lambda k: ode_log_likelihood(
        lambda x, t: x @ a.T, x1, manifold=Euclidean(d), prior_log_prob=lambda x0: gaussian_log_prob(x0, 1.0),
        steps=k), 100)
    x0 = x1 @ torch.linalg.matrix_exp(-a).T
    expected = gaussian_log_prob(x0, 1.0) - torch.trace(a)
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-3)


def test_time_dependent_scalar_field():
    """v = a(t) x with a(t) = 2t − 0.3: x1 = exp(∫a) x0, div = d·a(t), so log p1 = log p0(x1 e^{−0.7}) − 0.7 d."""
    d = 5
    x1 = torch.randn(4, d, generator=torch.Generator().manual_seed(4), dtype=D64)
    log_prob, _ = _extrapolated(lambda k: ode_log_likelihood(
        lambda x, t: (2 * t - 0.3).unsqueeze(-1) * x, x1, manifold=Euclidean(d),
        prior_log_prob=lambda x0: gaussian_log_prob(x0, 1.0), steps=k), 100)
    integral = 1.0 - 0.3
    expected = gaussian_log_prob(x1 * math.exp(-integral), 1.0) - d * integral
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------- spheres and products
def _polar_log_jacobian(theta1: torch.Tensor, c: float, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow of v = c(â − <â, x> x) on S^{n−1} for time 1, in the polar angle θ from â:
    tan(θ_t/2) = tan(θ_0/2) e^{−ct}. Returns (θ0, log |det dΦ|) at the end point θ1."""
    theta0 = 2 * torch.atan(torch.tan(theta1 / 2) * math.exp(c))
    dtheta = math.exp(-c) / (torch.cos(theta0 / 2) ** 2 + torch.sin(theta0 / 2) ** 2 * math.exp(-2 * c))
    log_det = torch.log(dtheta) + (n - 2) * (torch.log(torch.sin(theta1)) - torch.log(torch.sin(theta0)))
    return theta0, log_det


@pytest.mark.parametrize("n", [2, 3])
def test_sphere_gradient_flow_matches_closed_form(n):
    """Riemannian divergence on S^{n−1}: the uniform prior pushed by a conformal (gradient) flow."""
    c = 0.8
    a_hat = torch.zeros(n, dtype=D64)
    a_hat[0] = 1.0
    man = ProductManifold([Block.sphere("s", 1, n)])
    g = torch.Generator().manual_seed(5)
    x1 = man.project(torch.randn(6, n, generator=g, dtype=D64))

    def field(x, t):
        return c * (a_hat - (x @ a_hat).unsqueeze(-1) * x)

    def run(k):
        return ode_log_likelihood(field, x1, manifold=man, prior_log_prob=lambda x0: torch.full(
            (x0.shape[0],), -sphere_log_area(n), dtype=D64), steps=k)

    log_prob, x0 = _extrapolated(run, 100)
    theta1 = torch.atan2(x1[:, 1:].norm(dim=-1), x1[:, 0])
    theta0, log_det = _polar_log_jacobian(theta1, c, n)
    torch.testing.assert_close(torch.atan2(x0[:, 1:].norm(dim=-1), x0[:, 0]), theta0, rtol=0, atol=1e-3)
    torch.testing.assert_close(log_prob, -sphere_log_area(n) - log_det, rtol=0, atol=1e-3)
    assert run(1).dim == n - 1


def test_product_manifold_sums_its_factors():
    """Two S² spheres with the gradient flow, an S⁰ block (no tangent space) and a Euclidean block with a
    linear field: the log-density is the sum of the factors' closed forms."""
    c, d_e = 0.5, 2
    a = _linear_matrix(d_e, seed=6)
    man = ProductManifold([Block.sphere("w", 2, 3), Block.sphere("s0", 1, 1), Block.euclidean("b", d_e)])
    g = torch.Generator().manual_seed(7)
    x1 = man.project(torch.randn(5, man.dim, generator=g, dtype=D64))
    e3 = torch.tensor([1.0, 0.0, 0.0], dtype=D64)

    def field(x, t):
        w = x[:, :6].reshape(-1, 2, 3)
        vw = c * (e3 - (w @ e3).unsqueeze(-1) * w)
        return torch.cat([vw.reshape(-1, 6), torch.ones_like(x[:, 6:7]), x[:, 7:] @ a.T], dim=-1)

    def prior(x0):
        return -2 * sphere_log_area(3) - math.log(2.0) + gaussian_log_prob(x0[:, 7:], 1.0)

    log_prob, x0 = _extrapolated(lambda k: ode_log_likelihood(field, x1, manifold=man, prior_log_prob=prior,
                                                             steps=k), 100)
    w1 = x1[:, :6].reshape(-1, 2, 3)
    theta1 = torch.atan2(w1[..., 1:].norm(dim=-1), w1[..., 0])
    _, log_det = _polar_log_jacobian(theta1, c, 3)
    b0 = x1[:, 7:] @ torch.linalg.matrix_exp(-a).T
    expected = (-2 * sphere_log_area(3) - log_det.sum(-1) - math.log(2.0) + gaussian_log_prob(b0, 1.0)
                - torch.trace(a))
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(x0[:, 6], x1[:, 6])  # the S⁰ coordinate cannot move
    assert 2 * 2 + 0 + d_e == intrinsic_dim(man, man.dim)


def test_sphere_log_area():
    assert sphere_log_area(1) == pytest.approx(math.log(2))
    assert sphere_log_area(2) == pytest.approx(math.log(2 * math.pi))
    assert sphere_log_area(3) == pytest.approx(math.log(4 * math.pi))
    with pytest.raises(ValueError, match="≥ 1"):
        sphere_log_area(0)


# ---------------------------------------------------------------------------------- weight flows
@pytest.fixture(scope="module")
def tiny_flows():
    spec = NetworkSpec((3, 4, 2), "relu")
    flows = {}
    for kind in FLOWS:
        torch.manual_seed(0)
        flows[kind] = WeightFlow(FlowConfig(flow=kind, widths=spec.widths, d_model=8, num_layers=1,
                                            prior_std=0.5)).double().eval()
    return spec, flows


@pytest.mark.parametrize("kind", FLOWS)
def test_exact_divergence_is_the_projected_jacobian_trace(tiny_flows, kind):
    _, flows = tiny_flows
    flow = flows[kind]
    man = flow.data_manifold
    x = flow.sample_prior(3, generator=torch.Generator().manual_seed(1)).double()
    t = torch.full((3,), 0.4, dtype=D64)

    def field(xc):
        return man.proj_tangent(xc, flow.velocity(xc, t))

    _, div = divergence(field, x, man, chunk_size=7)
    for i in range(3):
        jac = torch.autograd.functional.jacobian(lambda xi: field(torch.cat([x[:i], xi[None], x[i + 1:]]))[i], x[i])
        p = torch.autograd.functional.jacobian(lambda v: man.proj_tangent(x[i:i + 1], v[None])[0],
                                               torch.zeros_like(x[i]))
        torch.testing.assert_close(div[i], torch.trace(p @ jac), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", FLOWS)
def test_hutchinson_is_unbiased(tiny_flows, kind):
    """Mean of many Rademacher probes within 5 standard errors of the exact trace (variance from the full
    Jacobian: Var zᵀMz = ½ Σ_{i≠j} (M_ij + M_ji)², M = PJP)."""
    _, flows = tiny_flows
    flow = flows[kind]
    man = flow.data_manifold
    x = flow.sample_prior(2, generator=torch.Generator().manual_seed(2)).double()
    t = torch.full((2,), 0.7, dtype=D64)

    def field(xc):
        return man.proj_tangent(xc, flow.velocity(xc, t))

    n = 1000
    _, exact = divergence(field, x, man)
    _, est = divergence(field, x, man, estimator="hutchinson", n_probes=n, chunk_size=500,
                        generator=torch.Generator().manual_seed(3))
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda xi: field(torch.cat([x[:i], xi[None], x[i + 1:]]))[i], x[i])
        p = torch.autograd.functional.jacobian(lambda v: man.proj_tangent(x[i:i + 1], v[None])[0],
                                               torch.zeros_like(x[i]))
        m = p @ jac @ p
        s = m + m.T
        var = 0.5 * (s.pow(2).sum() - s.diagonal().pow(2).sum())
        assert abs(float(est[i] - exact[i])) <= 5 * math.sqrt(float(var) / n) + 1e-9


@pytest.mark.parametrize("kind", FLOWS)
def test_log_likelihood_of_params_and_coords_agree(tiny_flows, kind):
    spec, flows = tiny_flows
    flow = flows[kind]
    params = spec.init(5, scheme="normal", std=0.5, generator=torch.Generator().manual_seed(4), dtype=D64)
    a = log_likelihood(flow, params, steps=4)
    b = log_likelihood(flow, flow.encode(params), steps=4, batch_size=2)
    torch.testing.assert_close(a.log_prob, b.log_prob)
    assert a.log_prob.shape == (5,) and torch.isfinite(a.log_prob).all()
    torch.testing.assert_close(a.log_prob, a.prior_log_prob - a.divergence_integral)
    assert a.dim == (spec.num_params if kind == "euclidean" else intrinsic_dim(flow.data_manifold, flow.dim))
    h = log_likelihood(flow, params, steps=4, estimator="hutchinson", n_probes=2,
                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(h.log_prob).all() and h.n_probes == 2


def test_prior_log_prob(tiny_flows):
    spec, flows = tiny_flows
    x = flows["euclidean"].sample_prior(4, generator=torch.Generator().manual_seed(0))
    expected = torch.distributions.Normal(0.0, 0.5).log_prob(x).sum(-1)
    torch.testing.assert_close(prior_log_prob(flows["euclidean"], x), expected)
    geo = flows["geometric"]
    xg = geo.sample_prior(4, generator=torch.Generator().manual_seed(0))
    lp = prior_log_prob(geo, xg)
    assert torch.isfinite(lp).all()
    # the sphere part is constant: moving a point along its spheres only changes the Euclidean part
    man = geo.data_manifold
    moved = xg.clone()
    moved[:, man.slices["layers.0.weight"]] = man.project(torch.randn_like(xg))[:, man.slices["layers.0.weight"]]
    torch.testing.assert_close(prior_log_prob(geo, moved), lp)
    assert prior_log_prob(geo, xg).equal(lp)  # deterministic (fixed-seed reference fit)


def test_log_likelihood_errors(tiny_flows):
    _, flows = tiny_flows
    flow = flows["euclidean"]
    with pytest.raises(ValueError, match="must be \\(B, 26\\)"):
        log_likelihood(flow, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="unknown divergence estimator"):
        log_likelihood(flow, torch.zeros(2, 26, dtype=D64), estimator="bogus")
    with pytest.raises(ValueError, match="steps"):
        log_likelihood(flow, torch.zeros(2, 26, dtype=D64), steps=0)
    with pytest.raises(ValueError, match="NaN"):
        log_likelihood(flow, torch.full((2, 26), float("nan"), dtype=D64))
    with pytest.raises(ValueError, match="batch_size"):
        log_likelihood(flow, torch.zeros(2, 26, dtype=D64), batch_size=0)


def test_default_batch_size_bounds_the_edge_features(monkeypatch, tiny_flows):
    """Large graphs are integrated a few networks at a time (160 MNIST1D networks at once ran out of 24 GB)."""
    import metaflow_ws.models.relational_transformer as rt
    from metaflow_ws.flows.likelihood import default_batch_size

    _, flows = tiny_flows
    flow = flows["geometric"]
    per_network = flow.field.topo.num_edges * flow.field.d_edge
    assert default_batch_size(flow) == min(256, rt.AUTO_CHECKPOINT_ELEMENTS // per_network)
    monkeypatch.setattr(rt, "AUTO_CHECKPOINT_ELEMENTS", 3 * per_network + 1)
    assert default_batch_size(flow) == 3
    monkeypatch.setattr(rt, "AUTO_CHECKPOINT_ELEMENTS", 1)
    assert default_batch_size(flow) == 1
    # batching does not change the result
    x = flow.sample_prior(5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(log_likelihood(flow, x, steps=3).log_prob,
                               log_likelihood(flow, x, steps=3, batch_size=5).log_prob)


# ------------------------------------------------------------------------------------------ detection
def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        p, n = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        pos = torch.randint(0, 6, (p,), generator=g).double() + 0.5 * (trial % 2)
        neg = torch.randint(0, 6, (n,), generator=g).double()
        labels = [1] * p + [0] * n
        expected = roc_auc_score(labels, torch.cat([pos, neg]).numpy())
        assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auroc(torch.tensor([0.0]), torch.tensor([1.0])) == 0.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


def test_midranks_match_scipy():
    from scipy.stats import rankdata

    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 0.5])
    assert midranks(x).tolist() == rankdata(x.numpy()).tolist()


def test_auroc_errors():
    with pytest.raises(ValueError, match="at least one"):
        auroc(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([float("nan")]), torch.tensor([1.0]))


def test_corruptions(small_spec):
    from conftest import random_params

    params = random_params(small_spec, 4)
    x = torch.randn(7, small_spec.in_features, dtype=D64)
    g = torch.Generator().manual_seed(0)
    noisy = corrupt_noise(small_spec, params, 0.1, generator=g)
    for k, v in params.items():
        rel = (noisy[k] - v).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()
        assert 0.02 < float(rel) < 0.3
    assert corrupt_noise(small_spec, params, 0.0, generator=g)["layers.0.weight"].equal(params["layers.0.weight"])
    perm = corrupt_row_permutation(small_spec, params, generator=torch.Generator().manual_seed(1))
    # each hidden layer keeps its multiset of rows, the output layer is untouched, the function changes
    for layer in range(small_spec.num_layers - 1):
        w, wp = params[f"layers.{layer}.weight"], perm[f"layers.{layer}.weight"]
        assert torch.sort(w.sum(-1), dim=1).values.allclose(torch.sort(wp.sum(-1), dim=1).values)
    assert perm[f"layers.{small_spec.num_layers - 1}.weight"].equal(params[f"layers.{small_spec.num_layers - 1}.weight"])
    assert not torch.allclose(small_spec.batched_forward(perm, x), small_spec.batched_forward(params, x))
    init = random_init(small_spec, 3, std=0.2, generator=torch.Generator().manual_seed(2))
    assert small_spec.batch_size(init) == 3
