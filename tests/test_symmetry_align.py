"""Permutation alignment: exact recovery of known permutations, brute-force optimality, function preservation."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaflow_ws.nets import NetworkSpec
from metaflow_ws.symmetry import (
    activation_matching,
    align,
    align_zoo,
    apply_permutation,
    hidden_activations,
    invert_permutation,
    random_permutation,
    solve_assignments,
    weight_matching,
)

SPECS = [NetworkSpec((5, 8, 6, 3), "relu"), NetworkSpec((4, 7, 7, 5, 2), "leaky_relu"), NetworkSpec((3, 9, 2), "tanh")]


def rand_params(spec: NetworkSpec, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return spec.init(batch, std=0.7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rand_x(spec: NetworkSpec, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, spec.in_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def trained_zoo():
    """breast_cancer, 6 runs × 5 epochs (≈ 1 s)."""
    from metaflow_ws.train import train_population

    return train_population("breast_cancer", 6, epochs=5, seed=3)


# ------------------------------------------------------------------------------------------- assignment
def test_solve_assignments_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    cost = torch.randn(20, 5, 5, generator=g, dtype=torch.float64)
    perm = solve_assignments(cost)
    for b in range(20):
        best = max(sum(float(cost[b, i, p[i]]) for i in range(5)) for p in itertools.permutations(range(5)))
        got = float(cost[b, torch.arange(5), perm[b]].sum())
        assert got == pytest.approx(best, abs=1e-12)
    low = solve_assignments(cost, maximize=False)
    assert (cost.gather(2, low.unsqueeze(-1)).sum((1, 2)) <= cost.gather(2, perm.unsqueeze(-1)).sum((1, 2))).all()
    with pytest.raises(ValueError, match="NaN"):
        solve_assignments(torch.full((1, 2, 2), float("nan")))


def test_weight_matching_one_hidden_layer_is_globally_optimal():
    """With one hidden layer the objective is a single assignment: compare with all 5! permutations."""
    spec = NetworkSpec((3, 5, 2), "relu")
    ref = {n: t[0] for n, t in rand_params(spec, 1, 1).items()}
    p = rand_params(spec, 6, 2)
    res = weight_matching(spec, p, ref)
    for b in range(6):
        def obj(perm):
            q = apply_permutation(spec, {n: t[b : b + 1] for n, t in p.items()}, [torch.tensor(perm)])
            return sum(float((ref[n] * q[n][0]).sum()) for n in spec.names if n != "layers.1.bias")
        best = max(obj(perm) for perm in itertools.permutations(range(5)))
        assert float(res.objective[b]) == pytest.approx(best, abs=1e-10)


# ------------------------------------------------------------------------------------ exact recovery
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weight_matching_recovers_a_known_permutation(spec, seed):
    ref = rand_params(spec, 1, seed)
    copies = {n: t.expand(5, *t.shape[1:]).clone() for n, t in ref.items()}
    perms = random_permutation(spec, 5, torch.Generator().manual_seed(100 + seed))
    shuffled = apply_permutation(spec, copies, perms)
    res = weight_matching(spec, shuffled, ref, generator=torch.Generator().manual_seed(seed))
    for got, want in zip(res.perms, invert_permutation(perms)):
        assert torch.equal(got, want)
    for n in ref:
        assert torch.equal(res.params[n], copies[n])
    assert bool(res.converged.all()) and res.method == "weight"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("similarity", ["correlation", "inner"])
def test_activation_matching_recovers_a_known_permutation(spec, similarity):
    ref = rand_params(spec, 1, 5)
    copies = {n: t.expand(4, *t.shape[1:]).clone() for n, t in ref.items()}
    perms = random_permutation(spec, 4, torch.Generator().manual_seed(6))
    shuffled = apply_permutation(spec, copies, perms)
    res = activation_matching(spec, shuffled, ref, rand_x(spec, 256, 7), similarity=similarity, chunk=3)
    for got, want in zip(res.perms, invert_permutation(perms)):
        assert torch.equal(got, want)
    for n in ref:
        assert torch.equal(res.params[n], copies[n])


def test_wrong_alignment_would_be_detected():
    """Sanity of the recovery tests: a different permutation does not reproduce the reference weights."""
    spec = SPECS[0]
    ref = rand_params(spec, 1, 0)
    perms = random_permutation(spec, 1, torch.Generator().manual_seed(9))
    shuffled = apply_permutation(spec, ref, perms)
    assert not torch.equal(shuffled["layers.0.weight"], ref["layers.0.weight"])
    wrong = apply_permutation(spec, shuffled, perms)  # not the inverse
    assert not all(torch.equal(wrong[n], ref[n]) for n in ref)


# ------------------------------------------------------------------------------------- trained networks
@pytest.mark.parametrize("method", ["weight", "activation"])
def test_alignment_of_trained_zoo_preserves_function(trained_zoo, method):
    spec, params = trained_zoo.spec, {n: t.double() for n, t in trained_zoo.params.items()}
    ref = spec.state_dict_of(params, 0)
    from metaflow_ws.tasks import get_task

    data = get_task("breast_cancer").data(0)
    res = align(spec, params, ref, method=method, probe=data.x_train.double())
    assert [p.shape for p in res.perms] == [(len(trained_zoo), n) for n in spec.hidden_widths]
    x = data.x_test.double()
    torch.testing.assert_close(spec.batched_forward(res.params, x), spec.batched_forward(params, x),
                               rtol=0, atol=1e-10)
    again = apply_permutation(spec, params, res.perms)
    assert all(torch.equal(again[n], res.params[n]) for n in params)
    # the reference itself stays where it is, and alignment pulls the others closer in weight space
    assert all(torch.equal(p[0], torch.arange(p.shape[1])) for p in res.perms)
    flat_ref = spec.flatten({n: t.unsqueeze(0) for n, t in ref.items()})
    before = (spec.flatten(params) - flat_ref).norm(dim=1)
    after = (spec.flatten(res.params) - flat_ref).norm(dim=1)
    assert (after <= before + 1e-9).all() if method == "weight" else after.mean() < before.mean()
    assert after[1:].mean() < 0.95 * before[1:].mean()


@pytest.mark.parametrize("init", ["forward", "identity"])
def test_weight_matching_objective_not_below_identity(trained_zoo, init):
    spec, params = trained_zoo.spec, trained_zoo.params
    ref = spec.state_dict_of(params, 2)
    res = weight_matching(spec, params, ref, init=init)
    ident = sum((ref[n] * params[n]).flatten(1).sum(1) for n in spec.names if n != "layers.2.bias")
    assert (res.objective >= ident - 1e-4).all() and bool(res.converged.all())
    # deterministic for a given generator seed
    again = weight_matching(spec, params, ref, init=init, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(res.perms, again.perms))
    # explicit starting permutations are accepted (and a converged start stays put)
    restart = weight_matching(spec, params, ref, init=res.perms)
    assert all(torch.equal(a, b) for a, b in zip(res.perms, restart.perms)) and restart.iterations == 1


def test_pairwise_reference_aligns_each_network_to_its_own_reference():
    spec = SPECS[0]
    refs = rand_params(spec, 3, 11)
    perms = random_permutation(spec, 3, torch.Generator().manual_seed(12))
    res = weight_matching(spec, apply_permutation(spec, refs, perms), refs)
    assert all(torch.equal(res.params[n], refs[n]) for n in refs)


def test_align_zoo(trained_zoo):
    out = align_zoo(trained_zoo, reference=0, method="activation")
    assert len(out) == len(trained_zoo) and out.info["alignment"]["method"] == "activation"
    assert all(torch.equal(out.metrics[k], trained_zoo.metrics[k]) for k in trained_zoo.metrics)
    assert all(torch.equal(out.params[n][0], trained_zoo.params[n][0]) for n in out.params)
    ref = trained_zoo.spec.state_dict_of(trained_zoo.params, 3)
    w = align_zoo(trained_zoo, reference=ref, method="weight")
    assert all(torch.equal(w.params[n][3], trained_zoo.params[n][3]) for n in w.params)
    assert w.info["alignment"]["reference"] == "given"


def test_hidden_activations_match_forward():
    spec = SPECS[1]
    p = rand_params(spec, 3, 0)
    x = rand_x(spec, 10, 1)
    acts = hidden_activations(spec, p, x)
    assert [a.shape for a in acts] == [(3, 10, n) for n in spec.hidden_widths]
    out = torch.einsum("bno,bko->bnk", acts[-1], p["layers.3.weight"]) + p["layers.3.bias"].unsqueeze(1)
    torch.testing.assert_close(out, spec.batched_forward(p, x), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ errors
def test_alignment_errors():
    spec = SPECS[0]
    p = rand_params(spec, 2, 0)
    ref = {n: t[0] for n, t in p.items()}
    with pytest.raises(ValueError, match="unknown alignment method 'foo'"):
        align(spec, p, ref, method="foo")
    with pytest.raises(ValueError, match="needs probe"):
        align(spec, p, ref, method="activation")
    with pytest.raises(ValueError, match=r"probe must be a \(N ≥ 2, 5\)"):
        activation_matching(spec, p, ref, torch.zeros(10, 4))
    bad = dict(p)
    bad["layers.1.weight"] = bad["layers.1.weight"].clone()
    bad["layers.1.weight"][1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'layers.1.weight' contains NaN.*networks \[1\]"):
        weight_matching(spec, bad, ref)
    with pytest.raises(ValueError, match="reference batch must hold 1 network or one per network"):
        weight_matching(spec, p, rand_params(spec, 3, 1))
    with pytest.raises(ValueError, match="init must be 'identity', 'forward'"):
        weight_matching(spec, p, ref, init="random")
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(spec, p, ref, max_iter=0)


@settings(max_examples=25, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=3, max_size=6),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_weight_matching_recovery_property(widths, batch, seed):
    spec = NetworkSpec(tuple(widths), "relu")
    ref = rand_params(spec, 1, seed)
    copies = {n: t.expand(batch, *t.shape[1:]).clone() for n, t in ref.items()}
    perms = random_permutation(spec, batch, torch.Generator().manual_seed(seed + 1))
    res = weight_matching(spec, apply_permutation(spec, copies, perms), ref)
    assert all(torch.equal(res.params[n], copies[n]) for n in ref)
