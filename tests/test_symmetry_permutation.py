"""Batched neuron permutations: function preservation, sensitivity, inverses, validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaflow_ws.nets import NetworkSpec
from metaflow_ws.symmetry import (
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from metaflow_ws.symmetry.permutation import permute_rows

SPEC = NetworkSpec((5, 6, 4, 3), "relu")


def rand_params(spec: NetworkSpec, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return spec.init(batch, std=0.7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rand_x(spec: NetworkSpec, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, spec.in_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@settings(max_examples=30, deadline=None)
@given(
    widths=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    activation=st.sampled_from(["relu", "tanh", "leaky_relu", "gelu"]),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_permutation_preserves_function(widths, activation, batch, seed):
    spec = NetworkSpec(tuple(widths), activation)
    p = rand_params(spec, batch, seed)
    x = rand_x(spec, 11, seed + 1)
    perms = random_permutation(spec, batch, torch.Generator().manual_seed(seed))
    q = apply_permutation(spec, p, perms)
    torch.testing.assert_close(spec.batched_forward(q, x), spec.batched_forward(p, x), rtol=0, atol=1e-12)
    # and undoing it gives back the exact weights
    back = apply_permutation(spec, q, invert_permutation(perms))
    for n in p:
        assert torch.equal(back[n], p[n])


def test_uncoupled_permutation_changes_function():
    """Permuting rows and biases of a layer without the next layer's columns must change the output."""
    p = rand_params(SPEC, 3, 0)
    x = rand_x(SPEC, 20, 1)
    perm = torch.tensor([1, 0, 2, 3, 4, 5]).expand(3, -1)
    wrong = dict(p)
    wrong["layers.0.weight"] = permute_rows(p["layers.0.weight"], perm)
    wrong["layers.0.bias"] = permute_rows(p["layers.0.bias"], perm)
    assert (SPEC.batched_forward(wrong, x) - SPEC.batched_forward(p, x)).abs().max() > 1e-3
    # the coupled version (columns of layers.1.weight too) is exact
    right = apply_permutation(SPEC, p, (perm, identity_permutation(SPEC, 3)[1]))
    torch.testing.assert_close(SPEC.batched_forward(right, x), SPEC.batched_forward(p, x), rtol=0, atol=1e-12)


def test_apply_permutation_moves_rows_bias_and_next_columns():
    p = rand_params(SPEC, 2, 3)
    perms = random_permutation(SPEC, 2, torch.Generator().manual_seed(5))
    q = apply_permutation(SPEC, p, perms)
    for b in range(2):
        p0, p1 = perms[0][b], perms[1][b]
        assert torch.equal(q["layers.0.weight"][b], p["layers.0.weight"][b][p0])
        assert torch.equal(q["layers.0.bias"][b], p["layers.0.bias"][b][p0])
        assert torch.equal(q["layers.1.weight"][b], p["layers.1.weight"][b][p1][:, p0])
        assert torch.equal(q["layers.1.bias"][b], p["layers.1.bias"][b][p1])
        assert torch.equal(q["layers.2.weight"][b], p["layers.2.weight"][b][:, p1])
        assert torch.equal(q["layers.2.bias"][b], p["layers.2.bias"][b])


def test_batched_equals_per_network_and_shared_perm_broadcasts():
    p = rand_params(SPEC, 4, 7)
    perms = random_permutation(SPEC, 4, torch.Generator().manual_seed(8))
    q = apply_permutation(SPEC, p, perms)
    for b in range(4):
        one = apply_permutation(SPEC, {n: t[b : b + 1] for n, t in p.items()}, [pp[b] for pp in perms])
        for n in p:
            assert torch.equal(one[n][0], q[n][b])


def test_random_permutation_is_reproducible_and_valid():
    a = random_permutation(SPEC, 50, torch.Generator().manual_seed(1))
    b = random_permutation(SPEC, 50, torch.Generator().manual_seed(1))
    c = random_permutation(SPEC, 50, torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    for p, n in zip(a, SPEC.hidden_widths):
        assert p.shape == (50, n) and p.dtype == torch.int64
        assert torch.equal(p.sort(1).values, torch.arange(n).expand(50, n))
    assert len(random_permutation(NetworkSpec((3, 2)), 4)) == 0  # no hidden layer, nothing to permute


def test_compose_and_invert():
    g = torch.Generator().manual_seed(3)
    p = rand_params(SPEC, 3, 4)
    f, s = random_permutation(SPEC, 3, g), random_permutation(SPEC, 3, g)
    two_steps = apply_permutation(SPEC, apply_permutation(SPEC, p, f), s)
    one_step = apply_permutation(SPEC, p, compose_permutations(f, s))
    for n in p:
        assert torch.equal(two_steps[n], one_step[n])
    ident = compose_permutations(f, invert_permutation(f))
    assert all(torch.equal(i, j) for i, j in zip(ident, identity_permutation(SPEC, 3)))


@pytest.mark.parametrize(
    "perms, message",
    [
        ([torch.arange(6).expand(2, 6)], "needs 2 permutations"),
        ([torch.arange(5).expand(2, 5), torch.arange(4).expand(2, 4)], "shape (2, 6)"),
        ([torch.zeros(2, 6, dtype=torch.long), torch.arange(4).expand(2, 4)], "exactly once"),
        ([torch.arange(6.0).expand(2, 6), torch.arange(4).expand(2, 4)], "integer tensor"),
        ([torch.arange(6).expand(3, 6), torch.arange(4).expand(3, 4)], "shape (2, 6)"),
    ],
)
def test_bad_permutations_raise(perms, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_permutation(SPEC, rand_params(SPEC, 2, 0), perms)
