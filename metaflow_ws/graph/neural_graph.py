"""The neural graph of an MLP (Kofinas et al. 2024): neurons are nodes, the weights that exist are edges.

For widths ``(n_0, ..., n_L)`` the graph has ``N = Σ n_l`` nodes (input, hidden and output neurons, layer by layer)
and ``E = Σ n_{l+1} n_l`` directed edges, one per weight, stored as an ``edge_index`` of shape ``(2, E)``
(``source`` = input-side neuron, ``target`` = output-side neuron). Memory is O(N + E); no N×N tensor exists.

Orders are the spec's flat order, so conversions are slices and concatenations:

- node ``node_offsets[l] + j`` is neuron ``j`` of neuron layer ``l`` (``l = 0`` inputs, ``l = L`` outputs);
- edge ``edge_offsets[i] + r·n_i + c`` is ``layers.i.weight[r, c]``: source ``node_offsets[i] + c``, target
  ``node_offsets[i+1] + r``.

Node features are biases (0 for input neurons), edge features are weights. A batch of B networks of one spec
shares the ``edge_index``; features keep the batch as a leading dim: nodes ``(B, N, f)``, edges ``(B, E, f)``.

Permuting the hidden neurons of a network is the same as relabelling nodes
(:meth:`NeuralGraph.node_permutation`), under which edges permute accordingly
(:meth:`NeuralGraph.edge_permutation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec, Params

__all__ = ["GraphFeatures", "NeuralGraph", "neural_graph"]


@dataclass(frozen=True)
class GraphFeatures:
    """Features of a batch of neural graphs sharing one ``edge_index``.

    ``nodes: (B, N, f)``, ``edges: (B, E, f)``; for weights ``f = 1`` (bias / weight value).
    """

    nodes: Tensor
    edges: Tensor


@dataclass(frozen=True, eq=False)
class NeuralGraph:
    """Sparse neural graph of a :class:`~metaflow_ws.nets.NetworkSpec` (build with :func:`neural_graph`).

    Tensors are shared by all users of the cached graph: treat them as read-only.
    """

    spec: NetworkSpec
    #: ``(2, E)`` long: row 0 source (input-side neuron), row 1 target (output-side neuron).
    edge_index: Tensor
    #: ``(N,)`` long: neuron layer of each node, ``0`` (inputs) … ``L`` (outputs).
    node_layer: Tensor
    #: ``(N,)`` long: index of each node within its layer.
    node_index: Tensor
    #: ``(E,)`` long: linear layer ``i`` (``layers.i.weight``) of each edge.
    edge_layer: Tensor
    #: ``(L + 2,)``: first node of each neuron layer, then ``N``.
    node_offsets: tuple[int, ...]
    #: ``(L + 1,)``: first edge of each linear layer, then ``E``.
    edge_offsets: tuple[int, ...]

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def num_nodes(self) -> int:
        return self.node_offsets[-1]

    @property
    def num_edges(self) -> int:
        return self.edge_offsets[-1]

    @property
    def num_layers(self) -> int:
        """L, the number of linear layers (neuron layers are ``0..L``)."""
        return self.spec.num_layers

    @property
    def source(self) -> Tensor:
        """``(E,)`` source node of every edge."""
        return self.edge_index[0]

    @property
    def target(self) -> Tensor:
        """``(E,)`` target node of every edge."""
        return self.edge_index[1]

    def layer_nodes(self, layer: int) -> slice:
        """Node slice of neuron layer ``layer`` (``0..L``)."""
        return slice(self.node_offsets[layer], self.node_offsets[layer + 1])

    def layer_edges(self, layer: int) -> slice:
        """Edge slice of linear layer ``layer`` (``0..L−1``), i.e. of ``layers.{layer}.weight`` flattened row-major."""
        return slice(self.edge_offsets[layer], self.edge_offsets[layer + 1])

    @property
    def hidden_mask(self) -> Tensor:
        """``(N,)`` bool: True on hidden neurons (the exchangeable ones)."""
        return (self.node_layer > 0) & (self.node_layer < self.num_layers)

    def to(self, device: torch.device | str) -> NeuralGraph:
        """A copy with the index tensors on ``device``."""
        return NeuralGraph(
            self.spec,
            self.edge_index.to(device),
            self.node_layer.to(device),
            self.node_index.to(device),
            self.edge_layer.to(device),
            self.node_offsets,
            self.edge_offsets,
        )

    # ----------------------------------------------------------------------------------- conversions
    def flat_to_graph(self, flat: Tensor) -> GraphFeatures:
        """``flat: (B, D)`` spec-ordered weights → nodes ``(B, N, 1)`` (biases, 0 on inputs), edges ``(B, E, 1)``."""
        d = self.spec.num_params
        if flat.dim() != 2 or flat.shape[1] != d:
            raise ValueError(f"flat weights for {self.spec.describe()} must have shape (B, {d}); got {tuple(flat.shape)}")
        off = self.spec.offsets
        edges = [flat[:, slice(*off[f"layers.{i}.weight"])] for i in range(self.num_layers)]
        nodes = [flat.new_zeros(flat.shape[0], self.spec.in_features)]
        nodes += [flat[:, slice(*off[f"layers.{i}.bias"])] for i in range(self.num_layers)]
        return GraphFeatures(torch.cat(nodes, 1).unsqueeze(-1), torch.cat(edges, 1).unsqueeze(-1))

    def params_to_graph(self, params: Mapping[str, Tensor]) -> GraphFeatures:
        """``{name: (B, ...)}`` → :class:`GraphFeatures` (nodes ``(B, N, 1)``, edges ``(B, E, 1)``)."""
        return self.flat_to_graph(self.spec.flatten(params))

    def graph_to_flat(self, nodes: Tensor, edges: Tensor) -> Tensor:
        """Inverse of :meth:`flat_to_graph`: nodes ``(B, N)`` or ``(B, N, 1)``, edges ``(B, E)`` or ``(B, E, 1)``
        → ``(B, D)``. Input-neuron node features are ignored (inputs carry no bias)."""
        nodes, edges = self._squeeze(nodes, self.num_nodes, "nodes"), self._squeeze(edges, self.num_edges, "edges")
        if nodes.shape[0] != edges.shape[0]:
            raise ValueError(f"nodes and edges must share the batch size; got {nodes.shape[0]} and {edges.shape[0]}")
        parts = []
        for i in range(self.num_layers):
            parts.append(edges[:, self.layer_edges(i)])
            parts.append(nodes[:, self.layer_nodes(i + 1)])
        return torch.cat(parts, 1)

    def graph_to_params(self, nodes: Tensor, edges: Tensor) -> Params:
        """Inverse of :meth:`params_to_graph`: ``{name: (B, ...)}`` (views of one new flat tensor)."""
        return self.spec.unflatten(self.graph_to_flat(nodes, edges))

    @staticmethod
    def _squeeze(x: Tensor, n: int, what: str) -> Tensor:
        if x.dim() == 3 and x.shape[-1] == 1:
            x = x.squeeze(-1)
        if x.dim() != 2 or x.shape[1] != n:
            raise ValueError(f"{what} must have shape (B, {n}) or (B, {n}, 1); got {tuple(x.shape)}")
        return x

    # ---------------------------------------------------------------------------------- permutations
    def edge_id(self, source: Tensor, target: Tensor) -> Tensor:
        """Edge ids of ``(source, target)`` node pairs (long tensors of one shape); raises if a pair is not an edge."""
        src_layer, tgt_layer = self.node_layer[source], self.node_layer[target]
        if not bool((tgt_layer == src_layer + 1).all()):
            raise ValueError("every (source, target) pair must connect neuron layer l to layer l + 1")
        widths = torch.tensor(self.spec.widths, device=source.device)
        e_off = torch.tensor(self.edge_offsets, device=source.device)
        return e_off[src_layer] + self.node_index[target] * widths[src_layer] + self.node_index[source]

    def node_permutation(self, perms: Mapping[int, Tensor]) -> Tensor:
        """``(N,)`` node relabelling for hidden-neuron permutations ``{layer: perm}``.

        ``layer`` is a hidden neuron layer ``1..L−1`` and ``perm[j]`` the old index of new neuron ``j``, i.e.
        ``W_{layer−1} ← W_{layer−1}[perm]``, ``b_{layer−1} ← b_{layer−1}[perm]``, ``W_layer ← W_layer[:, perm]``.
        The permuted network's node features are ``nodes[:, node_perm]``.
        """
        out = torch.arange(self.num_nodes, device=self.node_layer.device)
        for layer, perm in perms.items():
            if not 0 < layer < self.num_layers:
                raise ValueError(f"only hidden neuron layers 1..{self.num_layers - 1} can be permuted; got layer {layer}")
            n = self.spec.widths[layer]
            perm = torch.as_tensor(perm, device=out.device)
            if perm.shape != (n,) or not torch.equal(perm.sort().values, torch.arange(n, device=out.device)):
                raise ValueError(f"perm for layer {layer} must be a permutation of range({n}); got {perm.tolist()}")
            out[self.layer_nodes(layer)] = self.node_offsets[layer] + perm
        return out

    def edge_permutation(self, node_perm: Tensor) -> Tensor:
        """``(E,)`` edge relabelling induced by ``node_perm`` (from :meth:`node_permutation`): the permuted
        network's edge features are ``edges[:, edge_perm]``."""
        if node_perm.shape != (self.num_nodes,):
            raise ValueError(f"node_perm must have shape ({self.num_nodes},); got {tuple(node_perm.shape)}")
        if not bool((self.node_layer[node_perm] == self.node_layer).all()):
            raise ValueError("node_perm may only exchange nodes within a layer")
        return self.edge_id(node_perm[self.source], node_perm[self.target])


@lru_cache(maxsize=64)
def neural_graph(spec: NetworkSpec) -> NeuralGraph:
    """The (cached, CPU) :class:`NeuralGraph` of ``spec``; built in O(N + E) time and memory."""
    widths = spec.widths
    node_offsets = [0]
    for w in widths:
        node_offsets.append(node_offsets[-1] + w)
    edge_offsets = [0]
    sources, targets, layers = [], [], []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        rows = torch.arange(n_out).repeat_interleave(n_in)  # row-major over (r, c)
        cols = torch.arange(n_in).repeat(n_out)
        sources.append(node_offsets[i] + cols)
        targets.append(node_offsets[i + 1] + rows)
        layers.append(torch.full((n_in * n_out,), i, dtype=torch.long))
        edge_offsets.append(edge_offsets[-1] + n_in * n_out)
    node_layer = torch.cat([torch.full((w,), l, dtype=torch.long) for l, w in enumerate(widths)])
    node_index = torch.cat([torch.arange(w) for w in widths])
    return NeuralGraph(
        spec=spec,
        edge_index=torch.stack([torch.cat(sources), torch.cat(targets)]),
        node_layer=node_layer,
        node_index=node_index,
        edge_layer=torch.cat(layers),
        node_offsets=tuple(node_offsets),
        edge_offsets=tuple(edge_offsets),
    )
