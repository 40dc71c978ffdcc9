"""ReLU scale canonicalization and canonical coordinates (float64, tight tolerances)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaflow_ws.nets import NetworkSpec
from metaflow_ws.symmetry import (
    apply_permutation,
    canonical_dim,
    canonicalize,
    from_canonical,
    random_permutation,
    random_scales,
    rescale_neurons,
    to_canonical,
    weight_matching,
)

SPEC = NetworkSpec((6, 8, 5, 3), "relu")
SPECS = [SPEC, NetworkSpec((4, 7, 7, 5, 2), "leaky_relu"), NetworkSpec((3, 9, 2), "identity"), NetworkSpec((3, 2))]


def rand_params(spec: NetworkSpec, batch: int, seed: int) -> dict[str, torch.Tensor]:
    return spec.init(batch, std=0.7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def rand_x(spec: NetworkSpec, n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, spec.in_features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_function(spec, p, q, x, atol=1e-11):
    torch.testing.assert_close(spec.batched_forward(q, x), spec.batched_forward(p, x), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def trained_zoo():
    """breast_cancer, 4 runs × 5 epochs (< 1 s)."""
    from metaflow_ws.train import train_population

    return train_population("breast_cancer", 4, epochs=5, seed=1)


# ------------------------------------------------------------------------------------ rescaling symmetry
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_positive_rescaling_preserves_function_and_uncompensated_does_not(spec):
    p, x = rand_params(spec, 4, 0), rand_x(spec, 30, 1)
    scales = random_scales(spec, 4, torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same_function(spec, p, rescale_neurons(spec, p, scales), x)
    if spec.hidden_widths:  # scaling incoming weights without dividing the outgoing ones changes the function
        wrong = dict(p)
        wrong["layers.0.weight"] = p["layers.0.weight"] * scales[0].unsqueeze(-1)
        wrong["layers.0.bias"] = p["layers.0.bias"] * scales[0]
        assert (spec.batched_forward(wrong, x) - spec.batched_forward(p, x)).abs().max() > 1e-3


def test_rescale_rejects_bad_scales():
    p = rand_params(SPEC, 2, 0)
    good = random_scales(SPEC, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="finite and > 0"):
        rescale_neurons(SPEC, p, (-good[0], good[1]))
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        rescale_neurons(SPEC, p, (good[0][:, :3], good[1]))
    with pytest.raises(ValueError, match="needs 2 scale tensors"):
        rescale_neurons(SPEC, p, good[:1])


# ----------------------------------------------------------------------------------------- canonicalize
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_canonicalize_preserves_function_with_unit_rows(spec):
    p, x = rand_params(spec, 5, 3), rand_x(spec, 30, 4)
    c = canonicalize(spec, p)
    assert_same_function(spec, p, c, x)
    for layer in range(spec.num_layers - 1):
        norms = c[f"layers.{layer}.weight"].norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-13)
    again = canonicalize(spec, c)  # idempotent
    for n in p:
        torch.testing.assert_close(again[n], c[n], rtol=0, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(
    widths=st.lists(st.integers(1, 7), min_size=2, max_size=5),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    low=st.floats(0.01, 1.0),
)
def test_canonical_coordinates_are_scale_invariant(widths, batch, seed, low):
    spec = NetworkSpec(tuple(widths), "relu")
    p = rand_params(spec, batch, seed)
    scales = random_scales(spec, batch, torch.Generator().manual_seed(seed + 1), low=low, high=1 / low,
                           dtype=torch.float64)
    torch.testing.assert_close(to_canonical(spec, rescale_neurons(spec, p, scales)), to_canonical(spec, p),
                               rtol=1e-10, atol=1e-10)


def test_to_canonical_layout():
    p = rand_params(SPEC, 6, 5)
    flat = to_canonical(SPEC, p)
    assert flat.shape == (6, canonical_dim(SPEC)) == (6, SPEC.num_params + 1)
    q = SPEC.unflatten(flat[:, :-1])
    for layer in range(SPEC.num_layers - 1):  # hidden rows on unit spheres
        norms = q[f"layers.{layer}.weight"].norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-13)
    last = q["layers.2.weight"].flatten(1).norm(dim=1)  # the last weight matrix on one sphere
    torch.testing.assert_close(last, torch.ones_like(last), rtol=0, atol=1e-13)
    c = canonicalize(SPEC, p)
    torch.testing.assert_close(flat[:, -1], c["layers.2.weight"].flatten(1).norm(dim=1).log(), rtol=0, atol=1e-13)
    for n in ("layers.0.bias", "layers.1.bias", "layers.2.bias"):  # biases: Euclidean, as canonicalized
        torch.testing.assert_close(q[n], c[n], rtol=0, atol=1e-13)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_round_trips(spec):
    p, x = rand_params(spec, 4, 6), rand_x(spec, 25, 7)
    flat = to_canonical(spec, p)
    back = from_canonical(spec, flat)
    assert_same_function(spec, p, back, x)  # an equivalent network
    c = canonicalize(spec, p)
    for n in p:
        torch.testing.assert_close(back[n], c[n], rtol=0, atol=1e-13)
    torch.testing.assert_close(to_canonical(spec, back), flat, rtol=0, atol=1e-13)
    projected = from_canonical(spec, flat, project=True)
    for n in p:
        torch.testing.assert_close(projected[n], back[n], rtol=0, atol=1e-13)
    single = from_canonical(spec, flat[1])  # one unbatched network
    assert all(torch.equal(single[n], back[n][1]) for n in p)


def test_from_canonical_project_puts_blocks_back_on_spheres():
    p, x = rand_params(SPEC, 3, 8), rand_x(SPEC, 20, 9)
    flat = to_canonical(SPEC, p)
    drift = SPEC.unflatten(flat[:, :-1].clone())
    drift["layers.0.weight"] = drift["layers.0.weight"] * 1.7
    drift["layers.2.weight"] = drift["layers.2.weight"] * 0.3
    off = torch.cat([SPEC.flatten(drift), flat[:, -1:]], dim=1)
    assert_same_function(SPEC, p, from_canonical(SPEC, off, project=True), x)
    assert (SPEC.batched_forward(from_canonical(SPEC, off), x) - SPEC.batched_forward(p, x)).abs().max() > 1e-3


def test_permuted_and_rescaled_copy_has_the_same_canonical_form_after_alignment():
    spec = NetworkSpec((5, 8, 6, 3), "relu")
    p, x = rand_params(spec, 1, 10), rand_x(spec, 40, 11)
    copies = {n: t.expand(6, *t.shape[1:]).clone() for n, t in p.items()}
    g = torch.Generator().manual_seed(12)
    q = rescale_neurons(spec, apply_permutation(spec, copies, random_permutation(spec, 6, g)),
                        random_scales(spec, 6, g, low=0.1, high=10.0, dtype=torch.float64))
    assert_same_function(spec, copies, q, x, atol=1e-10)
    assert (to_canonical(spec, q) - to_canonical(spec, copies)).abs().max() > 1e-2  # permutation still there
    ref = canonicalize(spec, p)
    aligned = weight_matching(spec, canonicalize(spec, q), {n: t[0] for n, t in ref.items()}).params
    torch.testing.assert_close(to_canonical(spec, aligned), to_canonical(spec, copies), rtol=0, atol=1e-12)


def test_trained_networks_round_trip(trained_zoo):
    spec = trained_zoo.spec
    p = {n: t.double() for n, t in trained_zoo.params.items()}
    from metaflow_ws.tasks import get_task

    x = get_task("breast_cancer").data(0).x_test.double()
    assert_same_function(spec, p, from_canonical(spec, to_canonical(spec, p)), x, atol=1e-10)


# ----------------------------------------------------------------------------------------------- guards
def test_activation_without_positive_homogeneity_raises():
    spec = NetworkSpec((4, 5, 2), "tanh")
    p = rand_params(spec, 2, 0)
    for fn in (lambda: canonicalize(spec, p), lambda: to_canonical(spec, p),
               lambda: from_canonical(spec, torch.zeros(2, canonical_dim(spec), dtype=torch.float64)),
               lambda: rescale_neurons(spec, p, random_scales(spec, 2, dtype=torch.float64))):
        with pytest.raises(ValueError, match="positively homogeneous activation") as e:
            fn()
        assert "tanh" in str(e.value) and "relu" in str(e.value)


def test_nan_and_shape_errors():
    p = rand_params(SPEC, 3, 0)
    p["layers.1.bias"] = p["layers.1.bias"].clone()
    p["layers.1.bias"][2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'layers.1.bias' contains NaN.*networks \[2\]"):
        to_canonical(SPEC, p)
    bad = torch.zeros(2, canonical_dim(SPEC), dtype=torch.float64)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(networks \[1\]\)"):
        from_canonical(SPEC, bad)
    with pytest.raises(ValueError, match=rf"shape \(B, {canonical_dim(SPEC)}\)"):
        from_canonical(SPEC, torch.zeros(2, SPEC.num_params))


def test_zero_rows_are_guarded():
    p, x = rand_params(SPEC, 2, 1), rand_x(SPEC, 20, 2)
    p["layers.0.weight"] = p["layers.0.weight"].clone()
    p["layers.0.weight"][0, 3] = 0.0  # a neuron that only sees its bias
    p["layers.2.weight"] = p["layers.2.weight"].clone()
    p["layers.2.weight"][1] = 0.0  # a network whose output is its last bias
    flat = to_canonical(SPEC, p)
    assert torch.isfinite(flat).all()
    assert_same_function(SPEC, p, canonicalize(SPEC, p), x)
    assert_same_function(SPEC, p, from_canonical(SPEC, flat), x)
