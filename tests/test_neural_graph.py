"""Neural graph: structure, graph ↔ weights round trip, hidden permutations as node relabelling."""

import pytest
import torch

from metaflow_ws.graph import GraphFeatures, neural_graph
from metaflow_ws.nets import NetworkSpec

from conftest import random_params

SPECS = [NetworkSpec((5, 4, 3, 2)), NetworkSpec((30, 16, 16, 2)), NetworkSpec((3, 2)), NetworkSpec((1, 40, 40, 1))]


def permute_hidden(spec: NetworkSpec, params: dict, perms: dict[int, torch.Tensor]) -> dict:
    """Permute hidden neuron layer l by perm: rows of W_{l-1}, entries of b_{l-1}, columns of W_l."""
    out = dict(params)
    for layer, p in perms.items():
        out[f"layers.{layer - 1}.weight"] = out[f"layers.{layer - 1}.weight"][:, p]
        out[f"layers.{layer - 1}.bias"] = out[f"layers.{layer - 1}.bias"][:, p]
        out[f"layers.{layer}.weight"] = out[f"layers.{layer}.weight"][:, :, p]
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.widths)))
def test_structure(spec):
    g = neural_graph(spec)
    n = sum(spec.widths)
    e = sum(a * b for a, b in zip(spec.widths[:-1], spec.widths[1:]))
    assert (g.num_nodes, g.num_edges) == (n, e)
    assert g.edge_index.shape == (2, e) and g.edge_index.dtype == torch.long
    assert g.num_edges + g.num_nodes - spec.in_features == spec.num_params
    # every edge goes from neuron layer l to l + 1, and its linear layer is l
    assert torch.equal(g.node_layer[g.target], g.node_layer[g.source] + 1)
    assert torch.equal(g.edge_layer, g.node_layer[g.source])
    # no duplicate edges
    keys = g.source * n + g.target
    assert keys.unique().numel() == e
    # per-node index in layer and layer id
    for l, w in enumerate(spec.widths):
        assert torch.equal(g.node_index[g.layer_nodes(l)], torch.arange(w))
        assert torch.all(g.node_layer[g.layer_nodes(l)] == l)
    assert int(g.hidden_mask.sum()) == sum(spec.hidden_widths)
    assert neural_graph(spec) is g  # cached per spec


def test_mnist_graph_is_sparse():
    g = neural_graph(NetworkSpec((784, 10, 10)))
    assert (g.num_nodes, g.num_edges) == (804, 7940)
    assert g.edge_index.shape == (2, 7940)
    assert all(t.numel() <= 2 * 7940 for t in (g.edge_index, g.node_layer, g.node_index, g.edge_layer))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.widths)))
def test_graph_weights_round_trip_is_exact(spec):
    p = random_params(spec, 4)
    g = neural_graph(spec)
    feats = g.params_to_graph(p)
    assert isinstance(feats, GraphFeatures)
    assert feats.nodes.shape == (4, g.num_nodes, 1) and feats.edges.shape == (4, g.num_edges, 1)
    assert torch.all(feats.nodes[:, : spec.in_features] == 0)
    back = g.graph_to_params(feats.nodes, feats.edges)
    for k in p:
        assert torch.equal(back[k], p[k])
    assert torch.equal(g.graph_to_flat(feats.nodes.squeeze(-1), feats.edges.squeeze(-1)), spec.flatten(p))
    # individual entries land where the edge_index says
    for i in range(spec.num_layers):
        w = p[f"layers.{i}.weight"]
        sl = g.layer_edges(i)
        r = g.node_index[g.target[sl]]
        c = g.node_index[g.source[sl]]
        assert torch.equal(feats.edges[:, sl, 0], w[:, r, c])
        assert torch.equal(feats.nodes[:, g.layer_nodes(i + 1), 0], p[f"layers.{i}.bias"])


def test_hidden_permutation_is_node_relabelling():
    spec = NetworkSpec((5, 4, 3, 2))
    g = neural_graph(spec)
    p = random_params(spec, 3)
    gen = torch.Generator().manual_seed(0)
    perms = {1: torch.randperm(4, generator=gen), 2: torch.randperm(3, generator=gen)}
    q = permute_hidden(spec, p, perms)
    node_perm = g.node_permutation(perms)
    edge_perm = g.edge_permutation(node_perm)
    fp, fq = g.params_to_graph(p), g.params_to_graph(q)
    assert torch.equal(fq.nodes, fp.nodes[:, node_perm])
    assert torch.equal(fq.edges, fp.edges[:, edge_perm])
    # edge_perm maps the edge set onto itself consistently with the node relabelling
    assert torch.equal(g.source[edge_perm], node_perm[g.source])
    assert torch.equal(g.target[edge_perm], node_perm[g.target])
    assert torch.equal(edge_perm.sort().values, torch.arange(g.num_edges))
    # inputs and outputs keep their identity
    assert torch.equal(node_perm[g.layer_nodes(0)], torch.arange(5))
    assert torch.equal(node_perm[g.layer_nodes(3)], g.node_offsets[3] + torch.arange(2))


def test_errors():
    spec = NetworkSpec((5, 4, 3, 2))
    g = neural_graph(spec)
    with pytest.raises(ValueError, match=rf"\(B, {spec.num_params}\).*got \(2, 7\)"):
        g.flat_to_graph(torch.zeros(2, 7))
    with pytest.raises(ValueError, match=rf"nodes must have shape \(B, {g.num_nodes}\)"):
        g.graph_to_flat(torch.zeros(2, 3), torch.zeros(2, g.num_edges))
    with pytest.raises(ValueError, match="hidden neuron layers 1..2"):
        g.node_permutation({0: torch.arange(5)})
    with pytest.raises(ValueError, match="permutation of range"):
        g.node_permutation({1: torch.tensor([0, 0, 1, 2])})
    with pytest.raises(ValueError, match="connect neuron layer"):
        g.edge_id(torch.tensor([0]), torch.tensor([1]))
