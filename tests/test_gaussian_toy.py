"""Gaussian toy (thesis §4.1): statistics against closed forms, the analytic flow, a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from metaflow_ws.experiments.gaussian_toy import (
    AnalyticGaussianFlow,
    compare_populations,
    ks_two_sample,
    main,
    network_stats,
    predictor_gain,
    run_gaussian_toy,
    spread,
    spread_standard_error,
    target_spread,
    wasserstein1,
    write_outputs,
)
from metaflow_ws.flows import FlowConfig, SampleConfig, sample

D = 802  # 30-16-16-2 MLP


def _draws(n: int, d: int = D, mean: float = 1.0, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    return mean + std * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_target_spread_closed_form():
    assert target_spread(802) == pytest.approx(1 / math.sqrt(802))
    assert target_spread(100, std=2.0) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="dim"):
        target_spread(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spread_of_means_of_gaussian_draws_is_one_over_sqrt_d(seed):
    n = 2000
    s = network_stats(_draws(n, seed=seed))
    sigma = target_spread(D)
    # 4 standard errors of a sample std of n normal values: fails by chance with probability < 1e-4
    assert abs(spread(s.means) - sigma) < 4 * spread_standard_error(sigma, n)
    assert abs(s.means.mean() - 1.0) < 4 * sigma / math.sqrt(n)
    # per-network std of D unit-variance draws: ≈ 1 with s.e. ≈ 1/√(2D) per network, averaged over n networks
    assert abs(s.stds.mean() - 1.0) < 4 / math.sqrt(2 * D * n) + 1e-3


def test_spread_standard_error_matches_monte_carlo():
    g = np.random.default_rng(0)
    n = 50
    stds = [np.std(g.normal(size=n), ddof=1) for _ in range(4000)]
    assert np.std(stds) == pytest.approx(spread_standard_error(1.0, n), rel=0.08)


def test_spread_rejects_bad_input():
    with pytest.raises(ValueError, match="≥ 2"):
        spread([1.0])
    with pytest.raises(ValueError, match="D ≥ 2"):
        network_stats(torch.zeros(3))


def test_wasserstein1_closed_forms():
    a = np.random.default_rng(1).normal(size=257)
    assert wasserstein1(a, a) == 0.0
    assert wasserstein1(a, a[::-1].copy()) == 0.0  # order does not matter
    assert wasserstein1(a, a + 0.3) == pytest.approx(0.3, abs=1e-12)  # a shift moves every quantile
    assert wasserstein1(a, 2 * a) == pytest.approx(np.abs(a).mean(), rel=1e-12)  # |2a − a| quantile-wise
    assert wasserstein1([0.0], [1.0, 3.0]) == pytest.approx(2.0)  # unequal sizes: (1 + 3) / 2
    assert wasserstein1([0.0, 1.0], [0.0, 1.0, 1.0]) == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="non-empty"):
        wasserstein1([], [1.0])


def test_wasserstein1_agrees_with_scipy():
    from scipy.stats import wasserstein_distance

    g = np.random.default_rng(2)
    a, b = g.normal(size=101), g.normal(0.2, 1.5, size=64)
    assert wasserstein1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-10)


def test_ks_two_sample_tells_same_from_shifted():
    g = np.random.default_rng(3)
    a, b = g.normal(size=500), g.normal(size=500)
    assert ks_two_sample(a, a)[1] == pytest.approx(1.0)
    assert ks_two_sample(a, b + 0.5)[1] < 1e-6


def test_compare_populations_on_target_draws():
    x, ref = _draws(400, seed=4), _draws(400, seed=5)
    c = compare_populations(x, ref)
    assert c["n"] == 400
    assert abs(c["spread_ratio"] - 1) < 4 * spread_standard_error(1.0, 400)
    assert c["w1_means"] < 0.01 and c["ks_means_p"] > 1e-3
    collapsed = compare_populations(x - x.mean(1, keepdim=True) + 1.0, ref)  # every network's mean set to μ
    assert collapsed["spread_of_means"] < 1e-12 and collapsed["ks_means_p"] < 1e-6
    with pytest.raises(ValueError, match="dimension"):
        compare_populations(x[:, :10], ref)


def _analytic(shrink: float = 1.0, until: float = 1.0) -> AnalyticGaussianFlow:
    cfg = FlowConfig(flow="euclidean", widths=(30, 16, 16, 2), prior_std=1.0, d_model=8, num_layers=1)
    return AnalyticGaussianFlow(cfg, target_mean=1.0, target_std=1.0, mean_shrink=shrink, shrink_until=until)


def test_analytic_predictor_is_the_posterior_mean():
    flow = _analytic()
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4000, D, generator=g), 1 + torch.randn(4000, D, generator=g)
    t = torch.full((4000,), 0.3)
    xt = 0.7 * x0 + 0.3 * x1
    pred = flow.predict_x1(xt, t)
    # the posterior mean is the least-squares predictor: regression of x1 on x_t per coordinate has slope k(t)
    k = 0.3 / (0.49 + 0.09)
    assert float(flow.gain(torch.tensor([0.3]))) == pytest.approx(k)
    slope = ((xt - xt.mean()) * (x1 - x1.mean())).mean() / xt.var()
    assert float(slope) == pytest.approx(k, rel=0.01)
    assert float(((pred - x1) ** 2).mean()) == pytest.approx(1 - 0.3 * k, rel=0.01)  # Var(x1 | x_t)


def test_analytic_flow_deterministic_samples_match_target_and_shrinkage_loses_spread():
    n = 300
    x0 = _analytic().sample_prior(n, generator=torch.Generator().manual_seed(1))
    prior_spread = spread(network_stats(x0).means)
    exact = sample(_analytic(), n, SampleConfig(steps=64), x0=x0)
    collapsed = sample(_analytic(0.0, 0.8), n, SampleConfig(steps=64), x0=x0)
    noisy = sample(_analytic(0.0, 0.8), n, SampleConfig(steps=64, noise=1.0, noise_window=(0.5, 1.0)), x0=x0,
                   generator=torch.Generator().manual_seed(2))
    se, sc, sn = (network_stats(x) for x in (exact, collapsed, noisy))
    # the exact linear flow maps N(0, I) onto N(1, I) coordinate-wise: the spread of means is the prior's
    # (up to Euler error), the per-network std ≈ 1
    assert spread(se.means) == pytest.approx(prior_spread, rel=0.08)
    assert se.stds.mean() == pytest.approx(1.0, abs=0.03)
    # ignoring the mean of x_t until t = 0.8 loses most of the spread, noise over [0.5, 1) brings part back
    assert spread(sc.means) < 0.35 * prior_spread
    assert spread(sn.means) > 2 * spread(sc.means)
    assert sc.stds.mean() == pytest.approx(se.stds.mean(), abs=1e-4)  # other directions are untouched


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny end-to-end run (seed 3), written the way the CLI writes it."""
    out = tmp_path_factory.mktemp("gaussian_toy")
    r = run_gaussian_toy(out, quick=True, seed=3)
    write_outputs(out, r)
    return out, r


def test_quick_run_returns_markdown_figures_results(quick_run):
    out, r = quick_run
    assert set(r) == {"markdown", "figures", "results"}
    assert all(p.parent == out and p.suffix == ".png" and p.is_file() for p in r["figures"])
    json.dumps(r["results"], allow_nan=False)  # JSON-able
    assert "python -m metaflow_ws.experiments.gaussian_toy" in r["markdown"]
    assert "--quick" in r["markdown"] and "--seed 3" in r["markdown"]
    methods = {row["method"] for row in r["results"]["rows"]}
    assert any(m.startswith("learned") for m in methods) and any(m.startswith("analytic") for m in methods)


def test_quick_run_writes_readme_json_png(quick_run):
    out, _ = quick_run
    readme = (out / "README.md").read_text()
    assert "| method |" in readme and "spread of means" in readme
    res = json.loads((out / "results.json").read_text())
    assert res["dim"] == D and res["seed"] == 3 and res["wall_seconds"] > 0
    assert res["target"]["spread_of_means"] == pytest.approx(1 / math.sqrt(D))
    for name in res["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in readme
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_cli_rejects_unavailable_device(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["--out", str(tmp_path), "--quick", "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_full_run(tmp_path):
    r = run_gaussian_toy(tmp_path, quick=False)
    exact = [x for x in r["results"]["rows"] if x["method"].startswith("analytic: exact") and x["noise"] == 0.0]
    assert abs(exact[0]["spread_ratio"] - 1) < 0.15


@pytest.mark.parametrize(("lam", "t"), [(1.0, 0.3), (0.9, 0.3), (0.0, 0.6), (0.5, 0.95)])
def test_predictor_gain_recovers_the_analytic_shrinkage(lam, t):
    g = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(200, D, generator=g), 1 + torch.randn(200, D, generator=g)
    r = predictor_gain(_analytic(lam), t, x0, x1, target_mean=1.0, target_std=1.0, prior_std=1.0)
    assert r["mean_gain"] == pytest.approx(lam, abs=1e-4)
    assert r["other_gain"] == pytest.approx(1.0, abs=1e-4)
    assert r["mean_bias"] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="equal"):
        predictor_gain(_analytic(), t, x0, x1[:5], target_mean=1.0, target_std=1.0, prior_std=1.0)
