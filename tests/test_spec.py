import pytest
import torch
from torch import nn
from torch.func import functional_call

from metaflow_ws.nets import MLP, NetworkSpec

from conftest import random_params


def test_flatten_unflatten_round_trip(small_spec):
    p = random_params(small_spec, 7)
    flat = small_spec.flatten(p)
    assert flat.shape == (7, small_spec.num_params) == (7, 5 * 4 + 4 + 4 * 3 + 3 + 3 * 2 + 2)
    back = small_spec.unflatten(flat)
    for k in p:
        assert torch.equal(back[k], p[k])
    # unflatten returns views of the flat tensor
    back["layers.0.bias"][0, 0] = 123.0
    assert flat[0, small_spec.offsets["layers.0.bias"][0]] == 123.0


def test_functional_call_matches_spec_forward(small_spec):
    p = random_params(small_spec, 4)
    x = torch.randn(9, 5, dtype=torch.float64)
    base = small_spec.module("meta")
    ref = torch.func.vmap(lambda q: functional_call(base, q, (x,)))(p)
    assert torch.allclose(small_spec.batched_forward(p, x), ref)


def test_batched_forward_equals_loop_of_modules(small_spec):
    p = random_params(small_spec, 5)
    x = torch.randn(6, 5, dtype=torch.float64)
    out = small_spec.batched_forward(p, x)
    mods = small_spec.to_modules(p)
    for i, m in enumerate(mods):
        assert torch.allclose(out[i], m(x), atol=1e-12)
    # per-network inputs
    xb = torch.randn(5, 6, 5, dtype=torch.float64)
    out_b = small_spec.batched_forward(p, xb)
    for i, m in enumerate(mods):
        assert torch.allclose(out_b[i], m(xb[i]), atol=1e-12)


def test_modules_round_trip_and_sequential(small_spec):
    p = random_params(small_spec, 3, dtype=torch.float32)
    again = small_spec.from_modules(small_spec.to_modules(p))
    for k in p:
        assert torch.equal(again[k], p[k])
    seq = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    small_spec.load_into(seq, {k: v[1] for k, v in p.items()})
    x = torch.randn(4, 5)
    assert torch.allclose(seq(x), small_spec.forward({k: v[1] for k, v in p.items()}, x), atol=1e-6)


def test_hidden_permutation_preserves_function(small_spec):
    p = random_params(small_spec, 1)
    x = torch.randn(10, 5, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    q = dict(p)
    q["layers.0.weight"] = p["layers.0.weight"][:, perm]
    q["layers.0.bias"] = p["layers.0.bias"][:, perm]
    q["layers.1.weight"] = p["layers.1.weight"][:, :, perm]
    assert torch.allclose(small_spec.batched_forward(p, x), small_spec.batched_forward(q, x), atol=1e-12)
    # an uncoupled permutation (rows only) changes the function
    r = dict(q)
    r["layers.1.weight"] = p["layers.1.weight"]
    assert not torch.allclose(small_spec.batched_forward(p, x), small_spec.batched_forward(r, x), atol=1e-6)


def test_errors_name_the_problem(small_spec):
    p = random_params(small_spec, 2)
    with pytest.raises(ValueError, match="should have shape"):
        small_spec.flatten({**p, "layers.0.weight": torch.zeros(2, 3, 5)})
    with pytest.raises(ValueError, match="missing"):
        small_spec.flatten({k: v for k, v in p.items() if k != "layers.1.bias"})
    with pytest.raises(ValueError, match=r"\(B, 47\)"):
        small_spec.unflatten(torch.zeros(2, 46))
    with pytest.raises(ValueError, match="5 features"):
        small_spec.batched_forward(p, torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="do not match"):
        small_spec.params_of_module(MLP((5, 4, 2)))
    with pytest.raises(ValueError, match="unknown activation"):
        NetworkSpec((3, 2), "swishy")
    with pytest.raises(ValueError, match="at least two"):
        NetworkSpec((3,))


def test_spec_dict_round_trip(small_spec):
    assert NetworkSpec.from_dict(small_spec.to_dict()) == small_spec
    assert small_spec.positively_homogeneous and not NetworkSpec((2, 2), "tanh").positively_homogeneous
