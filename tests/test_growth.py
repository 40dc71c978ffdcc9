"""grow (Net2Net): wider and deeper networks computing exactly the same function; the errors."""

from __future__ import annotations

import pytest
import torch

from conftest import random_params
from metaflow_ws.nets import NetworkSpec, can_grow, grow

SPEC = NetworkSpec((5, 4, 3, 2))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("widths", [(5, 4, 3, 2), (5, 7, 6, 2), (5, 4, 3, 3, 2), (5, 9, 3, 6, 8, 2)],
                         ids=["same", "wider", "deeper", "both"])
@pytest.mark.parametrize("activation", ["relu", "identity"])
def test_grown_networks_compute_the_same_function(widths, activation):
    spec = NetworkSpec(SPEC.widths, activation)
    params = random_params(spec, 6, seed=1)
    grown = grow(spec, params, widths, generator=_gen())
    new = NetworkSpec(widths, activation)
    new.check(grown)
    x = torch.randn(40, 5, generator=_gen(2), dtype=torch.float64)
    torch.testing.assert_close(new.batched_forward(grown, x), spec.batched_forward(params, x), rtol=1e-12, atol=1e-12)
    if widths == SPEC.widths:
        assert all(torch.equal(grown[k], params[k]) for k in params)


def test_widening_copies_neurons_with_unequal_output_shares():
    params = random_params(SPEC, 3, seed=4)
    grown = grow(SPEC, params, (5, 12, 3, 2), generator=_gen(5))
    w0, w1 = grown["layers.0.weight"], grown["layers.1.weight"]  # [3, 12, 5], [3, 3, 12]
    for b in range(3):
        for j in range(4, 12):  # every new neuron copies the incoming weights of an old one ...
            i = int((w0[b, :4] == w0[b, j]).all(1).nonzero()[0])
            assert torch.equal(grown["layers.0.bias"][b, j], params["layers.0.bias"][b, i])
            assert not torch.allclose(w1[b, :, j], w1[b, :, i])  # ... with its own share of the outputs
        # the copies' output shares sum to the original outgoing weights
        src = torch.stack([(w0[b, :4] == w0[b, j]).all(1).int().argmax() for j in range(12)])
        summed = torch.zeros(3, 4, dtype=w1.dtype).index_add_(1, src, w1[b])
        torch.testing.assert_close(summed, params["layers.1.weight"][b])
    # other draws copy other neurons
    assert not torch.equal(grow(SPEC, params, (5, 12, 3, 2), generator=_gen(6))["layers.0.weight"], w0)


def test_deepening_inserts_identity_layers_before_the_output():
    params = random_params(SPEC, 2, seed=7)
    grown = grow(SPEC, params, (5, 4, 3, 3, 3, 2))
    for i in (2, 3):
        assert torch.equal(grown[f"layers.{i}.weight"], torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
        assert not grown[f"layers.{i}.bias"].any()
    assert torch.equal(grown["layers.4.weight"], params["layers.2.weight"])


@pytest.mark.parametrize("widths, message", [
    ((5, 4, 2), "fewer layers"),
    ((5, 3, 3, 2), r"hidden layer\(s\) \[1\].*narrower"),
    ((5, 4, 3, 2, 2), r"hidden layer\(s\) \[3\].*narrower"),  # an identity layer continuing width 3
    ((6, 4, 3, 2), "keeps its 5 inputs and 2 outputs"),
])
def test_shrinking_or_other_io_is_an_error(widths, message):
    with pytest.raises(ValueError, match=message):
        grow(SPEC, random_params(SPEC, 1), widths)
    assert not can_grow(SPEC, widths) and can_grow(SPEC, (5, 4, 3, 2)) and can_grow(SPEC, (5, 6, 3, 9, 2))


def test_deepening_needs_an_idempotent_activation():
    tanh = NetworkSpec(SPEC.widths, "tanh")
    params = random_params(tanh, 2)
    with pytest.raises(ValueError, match="only for relu or identity.*tanh"):
        grow(tanh, params, (5, 4, 3, 3, 2))
    grown = grow(tanh, params, (5, 8, 3, 2), generator=_gen())  # widening keeps any activation's function
    x = torch.randn(10, 5, generator=_gen(1), dtype=torch.float64)
    wide = NetworkSpec((5, 8, 3, 2), "tanh")
    torch.testing.assert_close(wide.batched_forward(grown, x), tanh.batched_forward(params, x))
    with pytest.raises(ValueError, match="no hidden layer"):
        grow(NetworkSpec((5, 2)), random_params(NetworkSpec((5, 2)), 1), (5, 2, 2))
