"""Calibration, functional diversity, Bayesian model averaging, novelty and full_metrics on batches of networks."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.distance import jensenshannon

from metaflow_ws.evaluation import (
    BMACurve,
    batch_metrics,
    bma_curve,
    bma_curve_from_outputs,
    brier_score,
    ensemble_metrics,
    expected_calibration_error,
    fit_output_scale,
    full_metrics,
    functional_diversity,
    js_divergence,
    mean_pairwise_disagreement,
    mean_pairwise_js,
    mean_pairwise_msd,
    nearest_neighbours,
    novelty,
    pairwise_js_matrix,
    prediction_disagreement,
    predictive_probs,
    reference_scale,
    reliability_bins,
)
from metaflow_ws.io import Zoo
from metaflow_ws.nets import NetworkSpec, index_params
from metaflow_ws.tasks import get_task

SPEC = NetworkSpec((5, 6, 3), "relu")


def rand_params(spec: NetworkSpec, batch: int, seed: int = 0, std: float = 0.8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return spec.init(batch, scheme="normal", std=std, generator=g, dtype=torch.float64)


def rand_x(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def loop_outputs(spec: NetworkSpec, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(B, N, out)`` by a Python loop of unbatched forward passes (the reference for the vmapped code)."""
    b = spec.batch_size(params)
    return torch.stack([spec.forward({k: v[i] for k, v in params.items()}, x) for i in range(b)])


def repeat_network(params: dict[str, torch.Tensor], index: int, times: int) -> dict[str, torch.Tensor]:
    return {k: v[index : index + 1].expand(times, *v.shape[1:]).clone() for k, v in params.items()}


def sort_by_bias_align(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A per-network permutation canonicalisation for one-hidden-layer nets: sort hidden neurons by bias."""
    perm = params["layers.0.bias"].argsort(dim=1)  # [B, H]
    out = dict(params)
    out["layers.0.bias"] = params["layers.0.bias"].gather(1, perm)
    out["layers.0.weight"] = params["layers.0.weight"].gather(1, perm.unsqueeze(-1).expand_as(params["layers.0.weight"]))
    w1 = params["layers.1.weight"]
    out["layers.1.weight"] = w1.gather(2, perm.unsqueeze(1).expand_as(w1))
    return out


@pytest.fixture(scope="module")
def bc_zoo() -> Zoo:
    from metaflow_ws.train import train_population

    return train_population("breast_cancer", 4, epochs=3, seed=0)


# ------------------------------------------------------------------------------------------- calibration
def test_predictive_probs_match_a_loop_over_modules():
    params = rand_params(SPEC, 4)
    x = rand_x(9, 5)
    probs = predictive_probs(SPEC, params, x, chunk=3)
    assert probs.shape == (4, 9, 3)
    for i in range(4):  # one network at a time, unbatched
        one = {k: v[i] for k, v in params.items()}
        torch.testing.assert_close(probs[i], torch.softmax(SPEC.forward(one, x), -1), rtol=0, atol=1e-12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 9, dtype=torch.float64))


def test_ece_of_an_exactly_calibrated_predictor_is_zero():
    # confidence 0.8 on 10 inputs with 8 correct, confidence 0.6 on 5 inputs with 3 correct: calibrated per bin
    p_hi = torch.tensor([[0.8, 0.2]], dtype=torch.float64).expand(10, 2)
    p_lo = torch.tensor([[0.4, 0.6]], dtype=torch.float64).expand(5, 2)
    probs = torch.cat([p_hi, p_lo]).unsqueeze(0)
    y = torch.tensor([0] * 8 + [1] * 2 + [1] * 3 + [0] * 2)
    assert float(expected_calibration_error(probs, y)) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_sampled_calibrated_predictor_is_small_and_sharpening_makes_it_large():
    g = torch.Generator().manual_seed(0)
    n = 60_000
    logits = 1.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    y = torch.multinomial(p, 1, generator=g).squeeze(1)  # labels drawn from the predicted distribution
    over = torch.softmax(3 * logits, -1)  # same ranking, over-confident
    ece = expected_calibration_error(torch.stack([p, over]), y)
    assert float(ece[0]) < 0.01
    assert float(ece[1]) > 0.1


def test_ece_of_an_overconfident_predictor_matches_hand_computation():
    # 4 inputs at confidence 0.95 with 3 correct, 4 at confidence 0.75 with 2 correct:
    # ECE = 4/8·|0.75 − 0.95| + 4/8·|0.5 − 0.75| = 0.1 + 0.125 = 0.225
    probs = torch.tensor([[0.95, 0.05]] * 4 + [[0.25, 0.75]] * 4, dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])
    calibrated = torch.tensor([[0.75, 0.25]] * 4 + [[0.5, 0.5]] * 4, dtype=torch.float64)  # 0.5 ties → class 0
    batch = torch.stack([probs, calibrated])
    ece = expected_calibration_error(batch, y)
    torch.testing.assert_close(ece, torch.tensor([0.225, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)
    bins = reliability_bins(batch, y, n_bins=15)
    torch.testing.assert_close(bins.ece, ece, rtol=0, atol=1e-12)
    assert bins.counts[0, 14] == 4 and bins.counts[0, 11] == 4 and bins.counts.sum() == 16
    assert float(bins.accuracy[0, 14]) == pytest.approx(0.75) and float(bins.confidence[0, 11]) == pytest.approx(0.75)
    # one bin: |mean accuracy − mean confidence| = |5/8 − 0.85|
    assert float(expected_calibration_error(probs.unsqueeze(0), y, n_bins=1)) == pytest.approx(0.225)


def test_ece_bins_are_right_closed():
    probs = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64)  # confidence exactly at the edge of 2 bins
    bins = reliability_bins(probs, torch.tensor([0]), n_bins=2)
    assert bins.counts.tolist() == [[1.0, 0.0]]


def test_brier_score_closed_form():
    probs = torch.tensor([[[0.7, 0.3]]], dtype=torch.float64)
    assert float(brier_score(probs, torch.tensor([0]))) == pytest.approx(0.18)
    c = 5
    uniform = torch.full((1, 3, c), 1.0 / c, dtype=torch.float64)
    assert float(brier_score(uniform, torch.tensor([0, 3, 4]))) == pytest.approx(1 - 1 / c)
    p = predictive_probs(SPEC, rand_params(SPEC, 3), rand_x(11, 5))
    y = torch.randint(0, 3, (11,), generator=torch.Generator().manual_seed(2))
    closed = (1 - 2 * p.gather(-1, y.view(1, -1, 1).expand(3, -1, 1)).squeeze(-1) + (p**2).sum(-1)).mean(-1)
    torch.testing.assert_close(brier_score(p, y), closed, rtol=0, atol=1e-12)


def test_calibration_rejects_bad_labels():
    probs = torch.full((2, 4, 3), 1 / 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        expected_calibration_error(probs, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        brier_score(probs, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        brier_score(probs, torch.zeros(4))


def _mean_nll(spec: NetworkSpec, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    return float(batch_metrics(spec, params, x, y, "classification")["loss"].mean())


def test_fit_output_scale_closed_form():
    # no hidden layer: logits (0, a·x0); three points right and one wrong, all with margin a, so the mean NLL
    # 3·log(1 + e^{−ca}) + log(1 + e^{ca}) is smallest where e^{ca} = 3: c = ln 3 / a
    a = 2.0
    spec = NetworkSpec((2, 2), "relu")
    params = {"layers.0.weight": torch.tensor([[[0.0, 0.0], [a, 0.0]]], dtype=torch.float64),
              "layers.0.bias": torch.zeros(1, 2, dtype=torch.float64)}
    x = torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64)
    y = torch.tensor([1, 1, 1, 0])
    scaled, c = fit_output_scale(spec, params, x, y)
    assert c == pytest.approx(math.log(3) / a, abs=1e-12)
    torch.testing.assert_close(scaled["layers.0.weight"], params["layers.0.weight"] * c)


def test_fit_output_scale_minimizes_the_mean_nll_and_keeps_every_prediction():
    params, x = rand_params(SPEC, 7, std=1.5), rand_x(40, 5)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3))
    scaled, c = fit_output_scale(SPEC, params, x, y)
    assert 1e-2 < c < 1e2
    torch.testing.assert_close(loop_outputs(SPEC, scaled, x), c * loop_outputs(SPEC, params, x))  # logits × c
    xt = rand_x(25, 5, seed=9)  # other inputs: the same top classes
    assert torch.equal(predictive_probs(SPEC, scaled, xt).argmax(-1), predictive_probs(SPEC, params, xt).argmax(-1))
    # the minimum of the convex mean NLL over c: below every point of a dense grid (the reference computation)
    last = {"layers.1.weight", "layers.1.bias"}
    grid = torch.exp(torch.linspace(math.log(1e-2), math.log(1e2), 801, dtype=torch.float64))
    nll = [_mean_nll(SPEC, {k: v * g if k in last else v for k, v in params.items()}, x, y) for g in grid]
    assert _mean_nll(SPEC, scaled, x, y) <= min(nll) + 1e-12
    assert abs(math.log(c) - math.log(float(grid[int(torch.tensor(nll).argmin())]))) <= 2 * math.log(1e4) / 800


def test_fit_output_scale_bounds_and_errors():
    spec = NetworkSpec((2, 2), "relu")
    params = {"layers.0.weight": torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), "layers.0.bias": torch.zeros(1, 2)}
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert fit_output_scale(spec, params, x, torch.tensor([1, 0]))[1] == pytest.approx(100)  # separable: upper bound
    assert fit_output_scale(spec, params, x, torch.tensor([0, 1]), bounds=(0.1, 10))[1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="bounds"):
        fit_output_scale(spec, params, x, torch.tensor([1, 0]), bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="NaN"):
        fit_output_scale(spec, {**params, "layers.0.bias": torch.tensor([[0.0, float("nan")]])}, x,
                         torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="shape"):
        fit_output_scale(spec, params, x, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="classifier"):
        fit_output_scale(NetworkSpec((2, 1), "relu"), {"layers.0.weight": torch.zeros(1, 1, 2),
                                                       "layers.0.bias": torch.zeros(1, 1)}, x, torch.tensor([0, 0]))


# --------------------------------------------------------------------------------------------- diversity
def test_js_of_identical_networks_is_zero():
    params = repeat_network(rand_params(SPEC, 3), 1, 5)
    x = rand_x(13, 5)
    assert float(functional_diversity(SPEC, params, x)) == 0.0
    assert float(pairwise_js_matrix(predictive_probs(SPEC, params, x)).abs().max()) == 0.0


def test_js_is_symmetric_and_bounded_by_log2():
    p = predictive_probs(SPEC, rand_params(SPEC, 6, std=2.0), rand_x(20, 5))
    m = pairwise_js_matrix(p)
    torch.testing.assert_close(m, m.T, rtol=0, atol=0)
    assert float(m.diagonal().abs().max()) == 0.0
    assert float(m.min()) >= 0 and float(m.max()) <= math.log(2)
    torch.testing.assert_close(js_divergence(p[0], p[1]), js_divergence(p[1], p[0]), rtol=0, atol=1e-15)
    # disjoint one-hot predictions reach the bound
    a = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    assert float(js_divergence(a, b)) == pytest.approx(math.log(2), abs=1e-15)


@pytest.mark.parametrize("max_elements", [1, 10, 1 << 22])
def test_mean_pairwise_js_equals_a_brute_force_double_loop(max_elements: int):
    params = rand_params(SPEC, 5, std=1.5)
    x = rand_x(7, 5)
    p = predictive_probs(SPEC, params, x)
    total, pairs = 0.0, 0
    for i in range(5):
        for j in range(i + 1, 5):
            per_input = [jensenshannon(p[i, n].numpy(), p[j, n].numpy()) ** 2 for n in range(7)]
            total += sum(per_input) / 7
            pairs += 1
    expected = total / pairs
    per_input = torch.tensor([jensenshannon(p[0, n].numpy(), p[3, n].numpy()) ** 2 for n in range(7)])
    torch.testing.assert_close(js_divergence(p[0], p[3]), per_input.double(), rtol=1e-9, atol=1e-15)
    assert float(js_divergence(p[2], p[2]).abs().max()) == 0.0
    assert float(mean_pairwise_js(p, max_elements=max_elements)) == pytest.approx(expected, rel=1e-9)
    assert float(functional_diversity(SPEC, params, x)) == pytest.approx(expected, rel=1e-9)
    assert float(pairwise_js_matrix(p, max_elements=max_elements).triu(1).sum()) / pairs == pytest.approx(expected, rel=1e-9)


def test_regression_diversity_equals_a_brute_force_double_loop():
    spec = NetworkSpec((2, 5, 3), "tanh")
    params = rand_params(spec, 4)
    x = rand_x(6, 2)
    out = loop_outputs(spec, params, x)
    pairs = [((out[i] - out[j]) ** 2).mean() for i in range(4) for j in range(i + 1, 4)]
    expected = torch.stack(pairs).mean()
    torch.testing.assert_close(mean_pairwise_msd(out), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(functional_diversity(spec, params, x, "regression"), expected, rtol=1e-12, atol=0)


def test_disagreement_equals_a_brute_force_double_loop_and_ignores_confidence():
    params = rand_params(SPEC, 6, std=1.5)
    x = rand_x(40, 5)
    labels = predictive_probs(SPEC, params, x).argmax(-1)
    pairs = [(labels[i] != labels[j]).double().mean() for i in range(6) for j in range(i + 1, 6)]
    expected = float(torch.stack(pairs).mean())
    assert 0 < expected < 1
    assert float(mean_pairwise_disagreement(labels)) == pytest.approx(expected, abs=1e-6)
    assert float(prediction_disagreement(SPEC, params, x)) == pytest.approx(expected, abs=1e-6)
    # scaling every network's last layer (weights and bias) changes its confidence, not its decisions: the same
    # disagreement, a different JS
    sharp = {k: v * 3.0 if k.startswith(f"layers.{SPEC.num_layers - 1}.") else v for k, v in params.items()}
    assert float(prediction_disagreement(SPEC, sharp, x)) == pytest.approx(expected, abs=1e-6)
    assert float(functional_diversity(SPEC, sharp, x)) > float(functional_diversity(SPEC, params, x))


def test_disagreement_closed_forms_and_errors():
    assert float(mean_pairwise_disagreement(torch.zeros(4, 7, dtype=torch.long))) == 0.0
    assert float(mean_pairwise_disagreement(torch.tensor([[0, 1, 2], [1, 2, 0]]))) == 1.0
    # three networks on one input, classes 0, 0, 1: one agreeing pair of three
    assert float(mean_pairwise_disagreement(torch.tensor([[0], [0], [1]]))) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_disagreement(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        mean_pairwise_disagreement(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="≥ 0"):
        mean_pairwise_disagreement(torch.tensor([[0, -1], [0, 1]]))


def test_diversity_needs_two_networks_and_a_known_kind():
    params = rand_params(SPEC, 1)
    with pytest.raises(ValueError, match="at least 2"):
        functional_diversity(SPEC, params, rand_x(3, 5))
    with pytest.raises(ValueError, match="kind"):
        functional_diversity(SPEC, rand_params(SPEC, 2), rand_x(3, 5), "ranking")


# ------------------------------------------------------------------------------------------------- BMA
def test_bma_with_one_network_equals_single_network_metrics():
    params = rand_params(SPEC, 5)
    x = rand_x(40, 5)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(3))
    order = torch.tensor([3, 0, 4, 1, 2])
    curve = bma_curve(SPEC, params, x, y, order=order)
    assert isinstance(curve, BMACurve) and curve.ks.tolist() == [1, 2, 3, 4, 5]
    single = batch_metrics(SPEC, index_params(params, slice(3, 4)), x, y, "classification")
    assert float(curve.accuracy[0]) == pytest.approx(float(single["accuracy"][0]))
    assert float(curve.nll[0]) == pytest.approx(float(single["loss"][0]), rel=1e-6)
    p3 = predictive_probs(SPEC, index_params(params, slice(3, 4)), x)
    assert float(curve.ece[0]) == pytest.approx(float(expected_calibration_error(p3, y)[0]), abs=1e-12)
    assert float(curve.brier[0]) == pytest.approx(float(brier_score(p3, y)[0]), abs=1e-12)
    # k = 2 by hand: average the probabilities of networks 3 and 0
    p = predictive_probs(SPEC, params, x)
    mean2 = (p[3] + p[0]) / 2
    nll2 = -torch.log(mean2.gather(1, y.view(-1, 1))).mean()
    assert float(curve.nll[1]) == pytest.approx(float(nll2), rel=1e-12)
    assert float(curve.accuracy[1]) == pytest.approx(float((mean2.argmax(1) == y).double().mean()))


def test_bma_of_identical_networks_is_constant():
    params = repeat_network(rand_params(SPEC, 2), 0, 6)
    x = rand_x(30, 5)
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(4))
    curve = bma_curve(SPEC, params, x, y)
    for v in (curve.accuracy, curve.nll, curve.ece, curve.brier):
        torch.testing.assert_close(v, v[:1].expand_as(v), rtol=0, atol=1e-12)
    spec = NetworkSpec((5, 4, 2), "relu")
    reg = repeat_network(rand_params(spec, 1), 0, 4)
    target = rand_x(30, 2, seed=5)
    mse = bma_curve(spec, reg, x, target, "regression").mse
    torch.testing.assert_close(mse, mse[:1].expand_as(mse), rtol=0, atol=1e-12)


def test_bma_random_orderings_are_reproducible_and_agree_at_full_size():
    params = rand_params(SPEC, 6)
    x = rand_x(25, 5)
    y = torch.randint(0, 3, (25,), generator=torch.Generator().manual_seed(6))
    a = bma_curve(SPEC, params, x, y, num_orderings=4, generator=torch.Generator().manual_seed(7))
    b = bma_curve(SPEC, params, x, y, num_orderings=4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.nll, b.nll, rtol=0, atol=0)
    assert a.num_orderings == 4 and a.per_ordering["nll"].shape == (4, 6)
    assert len({tuple(r) for r in a.orders.tolist()}) > 1
    full = a.per_ordering["nll"][:, -1]
    torch.testing.assert_close(full, full[:1].expand_as(full), rtol=1e-12, atol=0)
    ens = ensemble_metrics(SPEC, params, x, y)
    assert ens["nll"] == pytest.approx(float(a.nll[-1]), rel=1e-12)
    assert ens["accuracy"] == pytest.approx(float(a.accuracy[-1]))
    with pytest.raises(ValueError, match="Generator"):
        bma_curve(SPEC, params, x, y, num_orderings=2)


def test_bma_regression_k1_equals_single_network_mse():
    spec = NetworkSpec((5, 4, 2), "relu")
    params = rand_params(spec, 3)
    x, target = rand_x(12, 5), rand_x(12, 2, seed=8)
    curve = bma_curve_from_outputs(loop_outputs(spec, params, x), target, "regression",
                                   order=torch.tensor([2, 1, 0]))
    single = batch_metrics(spec, params, x, target, "regression")["mse"]
    assert float(curve.mse[0]) == pytest.approx(float(single[2]), rel=1e-12)
    assert curve.accuracy is None and set(curve.final()) == {"mse"}


# ---------------------------------------------------------------------------------------------- novelty
def _toy_zoo(spec: NetworkSpec, runs: int, per_run: int, seed: int = 0) -> Zoo:
    flat = torch.randn(runs * per_run, spec.num_params, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Zoo.from_flat("toy", spec, flat, run_id=torch.arange(runs).repeat_interleave(per_run),
                         step=torch.arange(per_run).repeat(runs))


def test_novelty_of_a_training_checkpoint_is_zero_and_reference_matches_brute_force():
    spec = NetworkSpec((3, 4, 2), "relu")
    zoo = _toy_zoo(spec, runs=4, per_run=3)
    res = novelty(zoo.select(torch.tensor([1, 7])), zoo)
    assert res.nearest.tolist() == [0.0, 0.0] and res.ratio.tolist() == [0.0, 0.0]
    assert res.nearest_index.tolist() == [1, 7] and res.nearest_run.tolist() == [0, 2]
    # reference: final checkpoints (step 2 of each run), nearest other run, median
    flat = zoo.flat()
    fin = flat[[2, 5, 8, 11]]
    brute = [min(float((fin[i] - fin[j]).norm()) for j in range(4) if j != i) for i in range(4)]
    assert res.reference_scale == pytest.approx(float(torch.tensor(brute, dtype=torch.float64).median()), rel=1e-12)
    scale, d = reference_scale(zoo)
    assert scale == res.reference_scale and sorted(d.tolist()) == pytest.approx(sorted(brute), rel=1e-12)
    # all checkpoints as reference: same-run checkpoints excluded
    s_all, d_all = reference_scale(zoo, reference="all")
    brute_all = [min(float((flat[i] - flat[j]).norm()) for j in range(12) if j // 3 != i // 3) for i in range(12)]
    assert d_all.tolist() == pytest.approx(brute_all, rel=1e-12)
    # compared with final checkpoints only: a non-final checkpoint is no longer at distance 0
    res_f = novelty(zoo.select(torch.tensor([1, 5])), zoo, checkpoints="final")
    assert res_f.nearest[0] > 0 and res_f.nearest[1] == 0 and int(res_f.nearest_index[1]) == 5


def test_novelty_of_a_far_sample_is_large():
    spec = NetworkSpec((3, 4, 2), "relu")
    zoo = _toy_zoo(spec, runs=5, per_run=1)
    far = spec.unflatten(zoo.flat()[:1] + 100.0)
    res = novelty(far, zoo)
    assert float(res.ratio[0]) > 5
    assert res.summary()["ratio_min"] == float(res.ratio[0])


def test_novelty_align_fn_removes_permutations():
    spec = NetworkSpec((3, 5, 2), "relu")
    zoo = _toy_zoo(spec, runs=3, per_run=1)
    perm = torch.tensor([4, 2, 0, 1, 3])
    p = zoo.params
    permuted = {
        "layers.0.weight": p["layers.0.weight"][:1, perm],
        "layers.0.bias": p["layers.0.bias"][:1, perm],
        "layers.1.weight": p["layers.1.weight"][:1, :, perm],
        "layers.1.bias": p["layers.1.bias"][:1],
    }
    x = rand_x(4, 3)
    torch.testing.assert_close(spec.batched_forward(permuted, x)[0], spec.batched_forward(p, x)[0])
    raw = novelty(permuted, zoo)
    aligned = novelty(permuted, zoo, align_fn=sort_by_bias_align)
    assert float(raw.nearest[0]) > 0.1
    assert float(aligned.nearest[0]) == 0.0 and aligned.aligned and not raw.aligned


def test_nearest_neighbours_chunking_and_validation():
    a, b = rand_x(7, 4), rand_x(5, 4, seed=2)
    d, i = nearest_neighbours(a, b, max_elements=5)
    full = torch.cdist(a, b)
    torch.testing.assert_close(d, full.min(1).values, rtol=1e-12, atol=1e-12)
    assert i.tolist() == full.argmin(1).tolist()
    with pytest.raises(ValueError, match="same D"):
        nearest_neighbours(a, rand_x(5, 3))
    with pytest.raises(ValueError, match="at least 2 runs"):
        novelty(_toy_zoo(NetworkSpec((3, 4, 2)), 1, 3).params, _toy_zoo(NetworkSpec((3, 4, 2)), 1, 3))


# ----------------------------------------------------------------------------------------- full_metrics
def test_full_metrics_classification_reuses_batch_metrics(bc_zoo: Zoo):
    m = full_metrics("breast_cancer", bc_zoo)
    assert set(m) == {"accuracy", "nll", "ece", "brier"}
    assert all(v.shape == (len(bc_zoo),) for v in m.values())
    x, y = get_task("breast_cancer").data(0).split("test")
    base = batch_metrics(bc_zoo.spec, bc_zoo.params, x, y, "classification")
    torch.testing.assert_close(m["accuracy"], base["accuracy"])
    torch.testing.assert_close(m["nll"], base["loss"])
    p = predictive_probs(bc_zoo.spec, bc_zoo.params, x)
    torch.testing.assert_close(m["ece"], expected_calibration_error(p, y))
    torch.testing.assert_close(m["brier"], brier_score(p, y))
    # the stored test metrics of the zoo agree
    torch.testing.assert_close(m["accuracy"], bc_zoo.metrics["test_accuracy"])
    with pytest.raises(ValueError, match="MLP"):
        full_metrics("breast_cancer", rand_params(SPEC, 2))


def test_full_metrics_regression():
    task = get_task("sinusoid")
    params = rand_params(task.spec, 3, std=0.3)
    m = full_metrics(task, params, split="val")
    x, y = task.data(0).split("val")
    expected = batch_metrics(task.spec, params, x.double(), y.double(), "regression")["mse"]
    assert set(m) == {"mse"}
    torch.testing.assert_close(m["mse"], expected)
