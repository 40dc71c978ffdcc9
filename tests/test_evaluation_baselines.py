"""Baseline populations built from a training zoo: final checkpoints, deep ensembles, noise, aligned averages."""

from __future__ import annotations

import warnings

import pytest
import torch

from metaflow_ws.evaluation import (
    aligned_average_baseline,
    bma_curve,
    deep_ensemble,
    ensemble_metrics,
    final_checkpoints,
    functional_diversity,
    noise_baseline,
)
from metaflow_ws.io import Zoo
from metaflow_ws.nets import NetworkSpec
from metaflow_ws.tasks import get_task


@pytest.fixture(scope="module")
def bc_zoo() -> Zoo:
    from metaflow_ws.train import train_population

    return train_population("breast_cancer", 4, epochs=3, seed=0)


@pytest.fixture(scope="module")
def bc_test() -> tuple[torch.Tensor, torch.Tensor]:
    return get_task("breast_cancer").data(0).split("test")


def sort_by_bias_align(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-network permutation canonicalisation of a one-hidden-layer net: sort hidden neurons by bias."""
    perm = params["layers.0.bias"].argsort(dim=1)
    w1 = params["layers.1.weight"]
    return {
        "layers.0.weight": params["layers.0.weight"].gather(1, perm.unsqueeze(-1).expand_as(params["layers.0.weight"])),
        "layers.0.bias": params["layers.0.bias"].gather(1, perm),
        "layers.1.weight": w1.gather(2, perm.unsqueeze(1).expand_as(w1)),
        "layers.1.bias": params["layers.1.bias"],
    }


def toy_zoo(spec: NetworkSpec, flat: torch.Tensor) -> Zoo:
    return Zoo.from_flat("toy", spec, flat)


def test_final_checkpoints_and_deep_ensemble(bc_zoo: Zoo, bc_test):
    fin = final_checkpoints(bc_zoo)
    ref = bc_zoo.final()
    assert len(fin) == 4 and fin.info["baseline"] == "final_checkpoints" and fin.info["runs"] == 4
    torch.testing.assert_close(fin.flat(), ref.flat(), rtol=0, atol=0)
    torch.testing.assert_close(fin.metrics["test_accuracy"], ref.metrics["test_accuracy"])
    assert "baseline" not in bc_zoo.info  # the source zoo is untouched

    ens = deep_ensemble(bc_zoo)
    assert ens.info["combine"] == "bma" and ens.info["members"] == [0, 1, 2, 3]
    x, y = bc_test
    m = ensemble_metrics(ens.spec, ens, x, y)
    assert m == pytest.approx(bma_curve(ens.spec, ens, x, y).final())
    sub = deep_ensemble(bc_zoo, 2, generator=torch.Generator().manual_seed(0))
    assert len(sub) == 2 and set(sub.info["members"]) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="Generator"):
        deep_ensemble(bc_zoo, 2)
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        deep_ensemble(bc_zoo, 5)


def test_noise_baseline_hits_the_target_diversity(bc_zoo: Zoo, bc_test):
    x, _ = bc_test
    spec = bc_zoo.spec
    base = float(functional_diversity(spec, bc_zoo.final(), x))
    target = 2.5 * base
    nb = noise_baseline(bc_zoo, x, target, generator=torch.Generator().manual_seed(0), num_samples=8, rtol=1e-2)
    assert len(nb) == 8 and nb.spec == spec and nb.info["baseline"] == "noise" and nb.info["converged"]
    achieved = float(functional_diversity(spec, nb, x))
    assert achieved == pytest.approx(target, rel=1e-2)
    assert achieved == pytest.approx(nb.info["achieved_diversity"], rel=1e-6)
    assert nb.info["sigma"] > 0 and nb.info["center_runs"] == [0, 1, 2, 3, 0, 1, 2, 3]
    # the noise is exactly sigma · N(0, I) around the final checkpoints, reproducible from the generator
    again = noise_baseline(bc_zoo, x, target, generator=torch.Generator().manual_seed(0), num_samples=8, rtol=1e-2)
    torch.testing.assert_close(again.flat(), nb.flat(), rtol=0, atol=0)
    resid = (nb.flat() - bc_zoo.final().flat().repeat(2, 1)) / nb.info["sigma"]
    assert float(resid.std()) == pytest.approx(1.0, rel=0.05)


def test_noise_baseline_target_from_a_population_and_single_centre(bc_zoo: Zoo, bc_test):
    x, _ = bc_test
    spec = bc_zoo.spec
    base = float(functional_diversity(spec, bc_zoo.final(), x))
    with pytest.raises(ValueError, match="below the diversity"):
        noise_baseline(bc_zoo, x, 0.5 * base, generator=torch.Generator().manual_seed(1))
    # a target given as a population (e.g. flow samples): here a second noise population
    other = noise_baseline(bc_zoo, x, 0.5 * base, generator=torch.Generator().manual_seed(1), num_centers=1,
                           num_samples=6)
    assert other.info["center_runs"] == [0] * 6
    assert float(functional_diversity(spec, other, x)) == pytest.approx(0.5 * base, rel=1e-2)
    matched = noise_baseline(bc_zoo, x, other, generator=torch.Generator().manual_seed(2), num_centers=1, num_samples=6)
    assert matched.info["target_diversity"] == pytest.approx(float(functional_diversity(spec, other, x)), rel=1e-6)
    assert float(functional_diversity(spec, matched, x)) == pytest.approx(matched.info["target_diversity"], rel=1e-2)
    with pytest.raises(ValueError, match="not reachable"):
        noise_baseline(bc_zoo, x, 0.7, generator=torch.Generator().manual_seed(3), num_centers=1, num_samples=4)


def test_noise_baseline_regression():
    spec = NetworkSpec((1, 8, 1), "tanh")
    g = torch.Generator().manual_seed(0)
    zoo = toy_zoo(spec, 0.5 * torch.randn(3, spec.num_params, generator=g, dtype=torch.float64))
    x = torch.linspace(-2, 2, 30, dtype=torch.float64).unsqueeze(1)
    base = float(functional_diversity(spec, zoo, x, "regression"))
    nb = noise_baseline(zoo, x, 3 * base, kind="regression", generator=torch.Generator().manual_seed(1),
                        num_samples=6, rtol=1e-3)
    assert float(functional_diversity(spec, nb, x, "regression")) == pytest.approx(3 * base, rel=1e-3)


def test_average_of_a_single_network_with_identity_align_is_that_network():
    spec = NetworkSpec((3, 5, 2), "relu")
    flat = torch.randn(1, spec.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    zoo = toy_zoo(spec, flat)
    out = aligned_average_baseline(zoo, 1, 3, align_fn=lambda p: p)
    assert len(out) == 3 and out.info["baseline"] == "aligned_average" and out.info["aligned"]
    torch.testing.assert_close(out.flat(), flat.expand(3, -1), rtol=0, atol=0)


def test_averages_of_random_subsets_match_their_members(tmp_path):
    spec = NetworkSpec((3, 5, 2), "relu")
    flat = torch.randn(5, spec.num_params, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    zoo = toy_zoo(spec, flat)
    out = aligned_average_baseline(zoo, 2, 6, align_fn=None, generator=torch.Generator().manual_seed(2))
    assert not out.info["aligned"] and len(out.info["subsets"]) == 6
    for i, members in enumerate(out.info["subsets"]):
        assert len(set(members)) == 2
        torch.testing.assert_close(out.flat()[i], flat[members].mean(0), rtol=0, atol=1e-15)
    everything = aligned_average_baseline(zoo, 5, 2, align_fn=None)
    torch.testing.assert_close(everything.flat(), flat.mean(0, keepdim=True).expand(2, -1), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="Generator"):
        aligned_average_baseline(zoo, 2, 3, align_fn=None)
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        aligned_average_baseline(zoo, 6, 3, align_fn=None)
    loaded = Zoo.load(out.save(tmp_path / "avg.safetensors"))  # info survives the zoo format
    assert loaded.info["subsets"] == out.info["subsets"]
    torch.testing.assert_close(loaded.flat(), out.flat())


def test_alignment_makes_the_average_of_permuted_copies_the_same_function():
    spec = NetworkSpec((3, 5, 2), "relu")
    net = spec.init(1, std=1.0, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    perm = torch.tensor([2, 4, 1, 0, 3])
    permuted = {"layers.0.weight": net["layers.0.weight"][:, perm], "layers.0.bias": net["layers.0.bias"][:, perm],
                "layers.1.weight": net["layers.1.weight"][:, :, perm], "layers.1.bias": net["layers.1.bias"]}
    zoo = toy_zoo(spec, torch.cat([spec.flatten(net), spec.flatten(permuted)]))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = spec.batched_forward(net, x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aligned = aligned_average_baseline(zoo, 2, 1, align_fn=sort_by_bias_align)
        raw = aligned_average_baseline(zoo, 2, 1, align_fn=None)
    torch.testing.assert_close(spec.batched_forward(aligned.params, x)[0], want, rtol=1e-12, atol=1e-12)
    assert float((spec.batched_forward(raw.params, x)[0] - want).abs().max()) > 1e-2
