"""Relational Transformer with edge updates over the sparse neural graph: the vector field of weight flows.

Architecture (Diao & Loynd 2023; Kofinas et al. 2024, neural graphs), for a batch of networks of one spec:

- **Inputs.** ``x: (B, D + n_globals)``: spec-ordered flat parameters (weights → edge features, biases → node
  features, see :mod:`metaflow_ws.graph`) and ``n_globals`` trailing global coordinates (e.g. ``log_scale``).
  Values are embedded per layer (``value · w_layer``), plus learned positional embeddings: one per neuron layer
  for nodes, one per linear layer for edges, and one per index for input and output neurons (hidden neurons
  are exchangeable and only get their layer's embedding). Global coordinates are embedded and added to every
  node and edge.
- **Conditioning.** ``c = MLP(sinusoidal(t)) + Linear_0(cond)`` (the task-embedding projection is
  zero-initialised, so ``cond`` starts as the identity). Every layer norm of nodes and edges is followed by a
  FiLM ``(1 + γ(c)) · x̂ + β(c)`` (adaLN), so time and task condition every node and edge feature.
- **Layers** (pre-LN, ``num_layers`` times):

  1. *attention over existing edges*: each node attends over its incoming and outgoing edges (the graph is
     used undirected, with separate key/value/score maps per direction). The score of a message from node
     ``j`` to node ``i`` over edge ``e`` is ``q_i · k_j / sqrt(d_head) + s(e)`` and its value ``v_j + W_v ê_e``;
     softmax per receiving node over all its messages; ``h ← h + W_o · attn``. (``W_v`` is applied after the
     aggregation, ``Σ α W_v ê = W_v Σ α ê``, so no per-edge value tensor is built);
  2. *node MLP*: ``h ← h + MLP(FiLM(LN(h)))`` (GELU, width ``4 d``);
  3. *edge update* from (target node, source node, edge): ``e ← e + W_2 GELU(A FiLM(LN(e)) + B h'_tgt + C h'_src)``
     with ``h' = FiLM(LN(h))`` (the concatenation MLP of the Relational Transformer, factorized so that no
     per-edge concatenation is materialized).
- **Heads.** Per-layer linear heads predict x1 for every weight (edges) and bias (non-input nodes); the globals
  are predicted from mean-pooled node and edge features.

Node features have width ``d_model`` and edge features ``d_edge`` (default ``d_model``). Message passing is
O(E) in time and memory; no N×N tensor is ever built. Two interchangeable aggregation
backends compute the same function (tested equal):

- ``"blocks"`` (default): uses that the edges of linear layer ``i`` are exactly ``n_{i+1} × n_i`` (every
  weight exists), so scores and aggregations are batched matrix products on ``(B, n_{i+1}, n_i)`` edge blocks;
- ``"scatter"``: generic message passing over ``edge_index`` with ``index_select`` / ``index_add`` on the
  node dim and :func:`torch_geometric.utils.softmax` (works for any sparse graph).

Everything is vectorized over the batch (leading dim), the only Python loops run over target-network layers.

**Other architectures.** The parameters depend only on the number of linear layers and the input/output sizes
(hidden neurons are exchangeable and share their layer's embeddings), so one model runs on every spec with the
same input/output sizes: ``forward(x, t, cond, spec=other)`` builds (and caches per device) the neural-graph
topology of ``other``. Other hidden widths need nothing more. Another *depth* reuses the per-layer value maps,
positional embeddings and readout heads through :func:`layer_map`: the first and last layers keep theirs and
every interior layer takes the embedding of an interior layer of the model's own spec at the same relative
depth (so 30-16-16-2 → 30-16-16-16-2 gives both hidden-to-hidden layers the one the model learned). That needs an
interior layer to copy: a model built for a one-hidden-layer spec (64-10-10) has no hidden-to-hidden linear
layer and cannot run deeper networks, and no model runs networks without a hidden layer.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C._functorch import maybe_current_level as _functorch_level
from torch.utils.checkpoint import checkpoint as _checkpoint

from metaflow_ws.graph.neural_graph import neural_graph
from metaflow_ws.nets.spec import NetworkSpec

__all__ = ["AUTO_CHECKPOINT_ELEMENTS", "Backend", "RTLayer", "RelationalTransformer", "layer_map",
           "sinusoidal_embedding"]

Backend = Literal["blocks", "scatter"]

#: ``checkpoint="auto"`` recomputes layers in the backward pass when one edge-feature tensor ``B·E·d_edge``
#: has at least this many elements (e.g. 784-10-10 at batch 32, d_edge 64: 16.3M; 30-16-16-2: 1.6M).
AUTO_CHECKPOINT_ELEMENTS: int = 2**23


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1_000.0) -> Tensor:
    """Transformer-style features of ``t: (B,)`` in ``[0, 1]``: ``(B, dim)`` cosines and sines of ``scale · t``
    at geometrically spaced frequencies (``dim`` even or odd; an odd last column is zero)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=t.dtype, device=t.device) / max(half, 1))
    args = (scale * t)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


def _film_linear(x_hat: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``Linear((1 + γ) ⊙ x_hat + β)`` with the per-sample FiLM folded into the weights (one ``baddbmm``).

    ``x_hat: (B, M, d)`` (layer-normalized), ``gamma, beta: (B, d)``, ``weight: (k, d)``, ``bias: (k,)``
    → ``(B, M, k)``.
    """
    w_b = (1.0 + gamma).unsqueeze(-1) * weight.t().unsqueeze(0)  # (B, d, k)
    b_b = beta @ weight.t()
    if bias is not None:
        b_b = b_b + bias
    return torch.baddbmm(b_b.unsqueeze(1), x_hat, w_b)


def _stretch(n_new: int, n_own: int) -> tuple[int, ...]:
    """Map positions ``0..n_new-1`` onto ``0..n_own-1``: ends to ends, interior to interior at the same relative
    depth (rounded half up). Needs ``n_own ≥ 3`` when ``n_new ≥ 3`` (an interior to map onto)."""
    if n_new == n_own:
        return tuple(range(n_new))
    out = [0] * n_new
    out[-1] = n_own - 1
    for i in range(1, n_new - 1):  # interior: 1..n_new-2 → 1..n_own-2
        frac = (i - 1) / (n_new - 3) if n_new > 3 else 0.5
        out[i] = 1 + math.floor(frac * (n_own - 3) + 0.5)
    return tuple(out)


def layer_map(own: NetworkSpec, other: NetworkSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Which of ``own``'s layers a vector field built for ``own`` uses for each layer of ``other``.

    Returns ``(linear, neurons)``: for every linear layer of ``other`` the index of ``own``'s linear layer whose
    value map, positional embedding and weight head it takes, and for every neuron layer (input, hidden…,
    output) the index of ``own``'s neuron layer. The identity for the same depth; for another depth the first
    and last layers map to ``own``'s first and last and interior layers to ``own``'s interior layers at the same
    relative depth. Raises ``ValueError`` when ``other`` has interior layers and ``own`` none, when either has
    no hidden layer, or when the input/output sizes differ.
    """
    if (other.in_features, other.out_features) != (own.in_features, own.out_features):
        raise ValueError(f"a vector field built for {own.describe()} runs on networks with {own.in_features} inputs "
                         f"and {own.out_features} outputs; got {other.describe()} (input and output neurons have "
                         "their own index embeddings)")
    n_own, n_new = own.num_layers, other.num_layers
    if n_new != n_own:
        if min(n_own, n_new) < 2:
            raise ValueError(f"a vector field built for {own.describe()} cannot run {other.describe()}: depth "
                             "transfer needs a hidden layer on both sides (its layers continue hidden layers)")
        if n_new > 2 and n_own < 3:
            raise ValueError(
                f"a vector field built for {own.describe()} has no hidden-to-hidden linear layer whose embeddings "
                f"a deeper network could reuse; it cannot run {other.describe()} (same depth: any hidden widths; "
                "deeper networks need a flow trained on networks with two or more hidden layers)")
    return _stretch(n_new, n_own), _stretch(n_new + 1, n_own + 1)


class _Topology(nn.Module):
    """Index buffers and layer offsets of the neural graph (moves with the model's ``.to(device)``).

    ``linear_src`` / ``neuron_src`` say which row of the *model's* per-layer parameters (embeddings, value maps,
    readout columns) every linear / neuron layer of ``spec`` uses: the identity on the model's own spec, through
    :func:`layer_map` (``own``, the model's spec) for another depth. :meth:`nodes_of` / :meth:`edges_of` expand
    such per-layer tables to every node / edge.
    """

    def __init__(self, spec: NetworkSpec, own: NetworkSpec | None = None) -> None:
        super().__init__()
        g = neural_graph(spec)
        lin, neu = layer_map(own or spec, spec)  # the identity on the model's own spec
        self.linear_src, self.neuron_src = lin, neu
        self.widths = spec.widths
        self.node_offsets = g.node_offsets
        self.edge_offsets = g.edge_offsets
        self.num_nodes = g.num_nodes
        self.num_edges = g.num_edges
        self.graph = g
        self.num_params = g.spec.num_params
        # fill the spec's cached layout now: torch.compile cannot trace functools.cached_property's first call
        g.spec.offsets  # noqa: B018
        self.register_buffer("source", g.source.clone(), persistent=False)
        self.register_buffer("target", g.target.clone(), persistent=False)
        self.register_buffer("receivers", torch.cat([g.target, g.source]), persistent=False)
        # nodes and edges are stored layer by layer: per-layer parameters are expanded block by block
        self.node_sizes = tuple(spec.widths)
        self.edge_sizes = tuple(spec.widths[i] * spec.widths[i + 1] for i in range(spec.num_layers))

    def nodes_of(self, table: Tensor) -> Tensor:
        """``(N, d)``: row ``neuron_src[l]`` of ``table: (L + 1, d)`` for every node of neuron layer ``l``."""
        return _expand_rows(table, self.neuron_src, self.node_sizes)

    def edges_of(self, table: Tensor) -> Tensor:
        """``(E, d)``: row ``linear_src[i]`` of ``table: (L, d)`` for every edge of linear layer ``i``."""
        return _expand_rows(table, self.linear_src, self.edge_sizes)


def _expand_rows(table: Tensor, rows: tuple[int, ...], sizes: tuple[int, ...]) -> Tensor:
    """``table[rows[i]]`` repeated ``sizes[i]`` times, blocks stacked: ``table[index]`` for a block-sorted index,
    whose backward sums each block (deterministic) where advanced indexing's backward accumulates with
    ``index_put_``, which on CPU adds atomically from several threads and so differs between runs."""
    return torch.cat([table[r].expand(n, -1) for r, n in zip(rows, sizes)], 0)


# ------------------------------------------------------------------------------------- aggregation backends
def _attend_scatter(
    topo: _Topology, q: Tensor, kf: Tensor, kb: Tensor, vf: Tensor, vb: Tensor, sf: Tensor, sb: Tensor, e_hat: Tensor
) -> tuple[Tensor, Tensor]:
    """Generic sparse attention over ``edge_index``.

    Node tensors ``q, kf, kb, vf, vb: (B, N, H, dh)`` (query; key/value when sending forward to a target /
    backward to a source), edge tensors ``sf, sb: (B, E, H)`` (edge score terms of the forward/backward
    message) and ``e_hat: (B, E, de)`` (normalized edge features). Every node ``i`` takes the softmax over the
    messages of its incoming and outgoing edges and returns ``(Σ α v_j, Σ α e_hat)``: ``(B, N, H, dh)`` and
    ``(B, N, H, de)``. (The edge value term ``W e_hat`` is applied after aggregation, by linearity.)
    """
    from torch_geometric.utils import softmax

    src, tgt = topo.source, topo.target
    scale = q.shape[-1] ** -0.5
    s_f = (q.index_select(1, tgt) * kf.index_select(1, src)).sum(-1) * scale + sf
    s_b = (q.index_select(1, src) * kb.index_select(1, tgt)).sum(-1) * scale + sb
    alpha = softmax(torch.cat([s_f, s_b], 1), topo.receivers, num_nodes=topo.num_nodes, dim=1)
    a_f, a_b = alpha.unsqueeze(-1).split(topo.num_edges, dim=1)  # (B, E, H, 1)
    # accumulate in the messages' dtype: under bfloat16 autocast the softmax is float32 and the values bfloat16
    m_f, m_b = a_f * vf.index_select(1, src), a_b * vb.index_select(1, tgt)
    agg_v = q.new_zeros(q.shape, dtype=m_f.dtype).index_add(1, tgt, m_f).index_add(1, src, m_b)
    e4 = e_hat.unsqueeze(2)
    e_f, e_b = a_f * e4, a_b * e4
    agg_e = q.new_zeros(*q.shape[:3], e_hat.shape[-1], dtype=e_f.dtype).index_add(1, tgt, e_f).index_add(1, src, e_b)
    return agg_v, agg_e


def _scores(a: Tensor, b: Tensor) -> Tensor:
    """``(B, R, H, dh), (B, C, H, dh) → (B, R, C, H)``: ``Σ_d a[b, r, h, d] · b[b, c, h, d]``, as one batched matmul
    over ``(B, H)``. (The equivalent einsum, under bfloat16 autocast and ``torch.compile`` on CPU in torch 2.13,
    gave non-finite gradients for ``b``: see ``tests/test_flows.py``.)"""
    return torch.matmul(a.transpose(1, 2), b.permute(0, 2, 3, 1)).permute(0, 2, 3, 1)


def _attend_blocks(
    topo: _Topology, q: Tensor, kf: Tensor, kb: Tensor, vf: Tensor, vb: Tensor, sf: Tensor, sb: Tensor, e_hat: Tensor
) -> tuple[Tensor, Tensor]:
    """Same as :func:`_attend_scatter`, computed on the complete bipartite edge block of every linear layer.

    Tensors are cut per layer with ``split`` (whose backward is one concatenation) rather than slicing (whose
    backward would zero-fill a full-size gradient per slice).
    """
    b, _, h, dh = q.shape
    de = e_hat.shape[-1]
    w = topo.widths
    n_layers = len(w) - 1
    scale = dh**-0.5
    n_sizes = list(w)
    e_sizes = [w[i] * w[i + 1] for i in range(n_layers)]
    q_, kf_, kb_, vf_, vb_ = (t.split(n_sizes, dim=1) for t in (q, kf, kb, vf, vb))
    sf_, sb_, eh_ = (t.split(e_sizes, dim=1) for t in (sf, sb, e_hat))
    s_in, s_out, e_blk = [], [], []
    for i in range(n_layers):
        shape = (b, w[i + 1], w[i], h)
        # forward messages: target r (layer i+1) receives from source c (layer i); backward: c receives from r
        s_in.append(_scores(q_[i + 1], kf_[i]) * scale + sf_[i].reshape(shape))
        s_out.append(_scores(kb_[i + 1], q_[i]) * scale + sb_[i].reshape(shape))
        e_blk.append(eh_[i].reshape(b, w[i + 1], w[i], de))
    # per-node softmax over incoming (block l-1, over c) and outgoing (block l, over r) messages
    m = []
    for l in range(n_layers + 1):
        parts = ([s_in[l - 1].amax(2)] if l > 0 else []) + ([s_out[l].amax(1)] if l < n_layers else [])
        m.append((parts[0] if len(parts) == 1 else torch.maximum(*parts)).detach())  # (B, n_l, H)
    p_in = [torch.exp(s_in[i] - m[i + 1].unsqueeze(2)) for i in range(n_layers)]
    p_out = [torch.exp(s_out[i] - m[i].unsqueeze(1)) for i in range(n_layers)]
    z = []
    for l in range(n_layers + 1):
        parts = ([p_in[l - 1].sum(2)] if l > 0 else []) + ([p_out[l].sum(1)] if l < n_layers else [])
        z.append(parts[0] if len(parts) == 1 else parts[0] + parts[1])
    agg_v: list[Tensor | None] = [None] * (n_layers + 1)
    agg_e: list[Tensor | None] = [None] * (n_layers + 1)

    def _acc(acc: list[Tensor | None], l: int, x: Tensor) -> None:
        acc[l] = x if acc[l] is None else acc[l] + x

    for i in range(n_layers):
        a_in = p_in[i] / z[i + 1].unsqueeze(2)  # (B, n_out, n_in, H)
        a_out = p_out[i] / z[i].unsqueeze(1)
        # receiver r sums over its sources c; receiver c sums over its targets r
        _acc(agg_v, i + 1, torch.einsum("brch,bchd->brhd", a_in, vf_[i]))
        _acc(agg_e, i + 1, torch.matmul(a_in.transpose(2, 3), e_blk[i]))  # (B, n_out, H, de)
        _acc(agg_v, i, torch.einsum("brch,brhd->bchd", a_out, vb_[i + 1]))
        _acc(agg_e, i, (a_out.unsqueeze(-1) * e_blk[i].unsqueeze(3)).sum(1))  # (B, n_in, H, de)
    return torch.cat(agg_v, 1), torch.cat(agg_e, 1)  # type: ignore[arg-type]


def _pair_scatter(topo: _Topology, pre: Tensor, a_tgt: Tensor, a_src: Tensor) -> Tensor:
    """``pre[e] + a_tgt[target(e)] + a_src[source(e)]``: ``(B, E, k), (B, N, k), (B, N, k) → (B, E, k)``."""
    return pre + a_tgt.index_select(1, topo.target) + a_src.index_select(1, topo.source)


def _pair_blocks(topo: _Topology, pre: Tensor, a_tgt: Tensor, a_src: Tensor) -> Tensor:
    """Block version of :func:`_pair_scatter` (broadcast over each ``(n_{i+1}, n_i)`` edge block)."""
    b, _, k = pre.shape
    w = topo.widths
    n_layers = len(w) - 1
    pre_ = pre.split([w[i] * w[i + 1] for i in range(n_layers)], dim=1)
    at_, as_ = a_tgt.split(list(w), dim=1), a_src.split(list(w), dim=1)
    out = []
    for i in range(n_layers):
        out_i = pre_[i].reshape(b, w[i + 1], w[i], k) + at_[i + 1].unsqueeze(2)
        out.append(out_i.add_(as_[i].unsqueeze(1)).reshape(b, -1, k))
    return torch.cat(out, 1) if n_layers > 1 else out[0]


_BACKENDS = {"blocks": (_attend_blocks, _pair_blocks), "scatter": (_attend_scatter, _pair_scatter)}


# ----------------------------------------------------------------------------------------------- layers
class RTLayer(nn.Module):
    """One pre-LN Relational Transformer layer: sparse attention → node MLP → edge update (see module doc).

    Node features have width ``d_model``, edge features ``d_edge``. Edge-side cost dominates (E ≫ N), so the
    per-edge work is one layer norm with the FiLM scale, one shared-weight product for all edge terms (the FiLM
    shift and the biases move to node-level terms, which is exact because the attention weights of a node sum to
    one and the edge MLP adds node terms anyway), the aggregation, and the edge MLP.
    """

    def __init__(self, d_model: int, d_edge: int, heads: int, d_edge_hidden: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        d, de, k = d_model, d_edge, d_edge_hidden
        self.d, self.de, self.heads, self.dh, self.k = d, de, heads, d // heads, k
        self.node_norm = nn.LayerNorm(d)
        self.node_qkv = nn.Linear(d, 5 * d)  # q, k_fwd, k_bwd, v_fwd, v_bwd
        self.edge_norm = nn.LayerNorm(de)
        self.edge_in = nn.Linear(de, 2 * heads + d + k)  # score fwd/bwd, value, edge-MLP input
        self.node_out = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, mlp_ratio * d)
        self.mlp_out = nn.Linear(mlp_ratio * d, d)
        self.update_norm = nn.LayerNorm(d)
        self.edge_nodes = nn.Linear(d, 2 * k)  # target / source terms of the edge MLP
        self.edge_out = nn.Linear(k, de, bias=False)
        # FiLM (γ, β) after the node-attention, edge, node-MLP and node-for-edge-update norms
        self.mod = nn.Linear(d, 6 * d + 2 * de)
        nn.init.normal_(self.mod.weight, std=0.02)
        nn.init.zeros_(self.mod.bias)

    def forward(self, h: Tensor, e: Tensor, c: Tensor, topo: _Topology, backend: str) -> tuple[Tensor, Tensor]:
        """``h: (B, N, d_model)``, ``e: (B, E, d_edge)``, ``c: (B, d_model)`` (activated conditioning)
        → updated ``(h, e)``."""
        attend, pair = _BACKENDS[backend]
        b, n, d = h.shape
        de, hh, dh, k = self.de, self.heads, self.dh, self.k
        m_att, m_edge, m_mlp, m_upd = self.mod(c).unsqueeze(1).split([2 * d, 2 * de, 2 * d, 2 * d], dim=-1)
        # 1. attention over incoming and outgoing edges
        g, s = m_att.chunk(2, dim=-1)
        q, kf, kb, vf, vb = self.node_qkv(torch.addcmul(s, self.node_norm(h), 1.0 + g)).split(d, dim=-1)
        g, s = m_edge.chunk(2, dim=-1)
        w_s, w_v, w_p = self.edge_in.weight.split([2 * hh, d, k], dim=0)  # rows: (out, de)
        # FiLM scale on the normalized edges; FiLM shift and biases applied at node level (exact: the attention
        # weights of a node sum to one and the edge MLP adds node terms anyway); one shared-weight product gives
        # the score and edge-MLP terms.
        s_shift, v_shift, pre_shift = (s.squeeze(1) @ self.edge_in.weight.t() + self.edge_in.bias).split(
            [2 * hh, d, k], -1
        )
        e_hat = self.edge_norm(e) * (1.0 + g)
        s_e, pre = F.linear(e_hat, torch.cat([w_s, w_p], 0)).split([2 * hh, k], dim=-1)
        sf, sb = (s_e + s_shift[:, None]).split(hh, dim=-1)
        vf = vf + v_shift[:, None]
        vb = vb + v_shift[:, None]
        heads = tuple(t.reshape(b, n, hh, dh) for t in (q, kf, kb, vf, vb))
        # Inductor (torch 2.13, CPU) fuses the bfloat16 block attention with the rest of the layer into a backward
        # with non-finite gradients for the node projections (the forward is right, so sampling under no_grad
        # keeps one graph). Compiling the attention apart is exact (tests/test_flows.py).
        apart = torch.is_grad_enabled() and torch.is_autocast_enabled(h.device.type)
        if apart:
            torch._dynamo.graph_break()
        agg_v, agg_e = attend(topo, *heads, sf, sb, e_hat)
        if apart:
            torch._dynamo.graph_break()
        # edge value term by linearity: Σ α (W_v e_hat) = W_v (Σ α e_hat), projected per head at node level
        attn = (agg_v + torch.einsum("bnhe,ehd->bnhd", agg_e, w_v.t().view(de, hh, dh))).reshape(b, n, d)
        h = h + self.node_out(attn)
        # 2. node MLP
        g, s = m_mlp.chunk(2, dim=-1)
        h = h + self.mlp_out(F.gelu(self.mlp_in(torch.addcmul(s, self.mlp_norm(h), 1.0 + g))))
        # 3. edge update from (target node, source node, edge)
        g, s = m_upd.chunk(2, dim=-1)
        a_tgt, a_src = self.edge_nodes(torch.addcmul(s, self.update_norm(h), 1.0 + g)).split(k, dim=-1)
        hidden = F.gelu(pair(topo, pre, a_tgt + pre_shift[:, None], a_src))
        e = torch.addmm(e.reshape(-1, de), hidden.reshape(-1, k), self.edge_out.weight.t()).view(e.shape)
        return h, e


class RelationalTransformer(nn.Module):
    """Vector field over the weights of networks of ``spec`` (predicts x1 in the input's flat layout).

    Args:
        spec: architecture of the generated networks.
        d_model: width of node features (and of edge features unless ``d_edge`` is given; thesis: 32 or 64).
        num_layers: number of :class:`RTLayer` s (thesis: 5).
        heads: attention heads (``d_model`` must be divisible by it; thesis: 1).
        n_globals: trailing global Euclidean coordinates of ``x`` (e.g. 1 for ``log_scale``).
        cond_dim: size of the task embedding ``cond`` (0: no conditioning).
        d_edge: width of edge features (default ``d_model``). Edge work dominates the cost (E ≫ N), so
            ``d_edge < d_model`` is the cheap way to a smaller model (the thesis's d_E).
        d_edge_hidden: hidden width of the edge-update MLP (default ``d_edge``).
        backend: ``"blocks"`` (fast, layer-block batched products) or ``"scatter"`` (generic ``edge_index``
            message passing); both compute the same function.
        anchor: take a second network, the *anchor*, as input next to ``x`` (its weights and biases become
            extra edge and node features). The model stays equivariant to permuting x and the anchor together;
            with one fixed anchor (e.g. the shared initialization of a family zoo) it can tell neurons apart
            and so learn a distribution that lives in one permutation basin.
        checkpoint: recompute each layer in the backward pass (activation checkpointing): training memory
            drops roughly by the number of layers, compute rises by about a third. ``"auto"`` turns it on
            when a batch's edge features ``B·E·d_edge`` reach :data:`AUTO_CHECKPOINT_ELEMENTS` (784-input
            networks at batch 32), so those train in under 2 GB.
    """

    def __init__(
        self,
        spec: NetworkSpec,
        *,
        d_model: int = 64,
        num_layers: int = 5,
        heads: int = 1,
        n_globals: int = 0,
        cond_dim: int = 0,
        d_edge: int | None = None,
        d_edge_hidden: int | None = None,
        backend: Backend = "blocks",
        checkpoint: bool | Literal["auto"] = "auto",
        anchor: bool = False,
    ) -> None:
        super().__init__()
        de = d_model if d_edge is None else int(d_edge)
        k = de if d_edge_hidden is None else int(d_edge_hidden)
        if min(d_model, de, k, heads) <= 0 or num_layers < 0 or n_globals < 0 or cond_dim < 0:
            raise ValueError(
                "expected positive d_model, d_edge, d_edge_hidden, heads and non-negative num_layers, n_globals, "
                f"cond_dim; got d_model={d_model}, d_edge={de}, d_edge_hidden={k}, heads={heads}, "
                f"num_layers={num_layers}, n_globals={n_globals}, cond_dim={cond_dim}"
            )
        if d_model % heads:
            raise ValueError(f"d_model must be divisible by heads; got d_model={d_model}, heads={heads}")
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {sorted(_BACKENDS)}")
        if checkpoint not in (True, False, "auto"):
            raise ValueError(f"checkpoint must be True, False or 'auto'; got {checkpoint!r}")
        self.spec = spec
        self.d_model, self.d_edge, self.heads = d_model, de, heads
        self.n_globals, self.cond_dim = n_globals, cond_dim
        self.backend: str = backend
        self.checkpoint: bool | str = checkpoint
        self.topo = _Topology(spec)
        self._topologies: dict[tuple[NetworkSpec, str], _Topology] = {}  # other hidden widths (not in state_dict)
        d, n_lin = d_model, spec.num_layers
        # input embeddings: per-layer value maps and positional embeddings
        self.node_value = nn.Parameter(torch.randn(n_lin + 1, d))
        self.node_layer_emb = nn.Parameter(0.5 * torch.randn(n_lin + 1, d))
        self.input_emb = nn.Parameter(0.5 * torch.randn(spec.in_features, d))
        self.output_emb = nn.Parameter(0.5 * torch.randn(spec.out_features, d))
        self.edge_value = nn.Parameter(torch.randn(n_lin, de))
        self.edge_layer_emb = nn.Parameter(0.5 * torch.randn(n_lin, de))
        self.node_anchor_value = nn.Parameter(torch.randn(n_lin + 1, d)) if anchor else None
        self.edge_anchor_value = nn.Parameter(torch.randn(n_lin, de)) if anchor else None
        self.globals_in = nn.Linear(n_globals, d + de) if n_globals else None
        # conditioning: time (+ zero-initialised task embedding)
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.cond_in = nn.Linear(cond_dim, d) if cond_dim else None
        if self.cond_in is not None:
            nn.init.zeros_(self.cond_in.weight)
            nn.init.zeros_(self.cond_in.bias)
        self.layers = nn.ModuleList(RTLayer(d, de, heads, k) for _ in range(num_layers))
        # heads: per-layer linear readouts, and pooled globals
        self.final_node_norm = nn.LayerNorm(d)
        self.final_edge_norm = nn.LayerNorm(de)
        self.final_mod = nn.Linear(d, 2 * d + 2 * de)
        nn.init.normal_(self.final_mod.weight, std=0.02)
        nn.init.zeros_(self.final_mod.bias)
        self.edge_head = nn.Linear(de, n_lin)  # column i: weights of layers.i
        self.node_head = nn.Linear(d, n_lin + 1)  # column l: biases of neuron layer l (l ≥ 1)
        self.globals_out = (
            nn.Sequential(nn.Linear(d + de, d), nn.GELU(), nn.Linear(d, n_globals)) if n_globals else None
        )

    # ---------------------------------------------------------------------------------------- helpers
    @property
    def dim(self) -> int:
        """Length of the flat input/output: ``D + n_globals``."""
        return self.spec.num_params + self.n_globals

    def _node_positions(self, topo: _Topology | None = None) -> Tensor:
        """``(N, d)`` positional embeddings: layer embedding, plus index embeddings on input/output neurons."""
        pos = (self.topo if topo is None else topo).nodes_of(self.node_layer_emb)
        n_in, n_out = self.spec.in_features, self.spec.out_features
        return torch.cat([pos[:n_in] + self.input_emb, pos[n_in:-n_out], pos[-n_out:] + self.output_emb], 0)

    def check_spec(self, spec: NetworkSpec) -> None:
        """Raise ``ValueError`` unless this model can run on networks of ``spec``: the same input and output
        sizes as the spec it was built for, any hidden widths, and another depth where :func:`layer_map` has
        layers to reuse."""
        layer_map(self.spec, spec)

    def topology(self, spec: NetworkSpec | None = None, device: torch.device | None = None) -> _Topology:
        """Neural-graph index buffers for ``spec`` (default: the model's own), cached per (spec, device)."""
        if spec is None or spec == self.spec:
            return self.topo
        self.check_spec(spec)
        device = self.topo.source.device if device is None else torch.device(device)
        key = (spec, str(device))
        topo = self._topologies.get(key)
        if topo is None:
            topo = self._topologies[key] = _Topology(spec, self.spec).to(device)
        return topo

    def _check_inputs(
        self, x: Tensor, t: Tensor | float, cond: Tensor | None, spec: NetworkSpec | None = None
    ) -> tuple[Tensor, Tensor | None]:
        spec = self.spec if spec is None else spec
        dim = spec.num_params + self.n_globals
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(
                f"x must have shape (B, {dim}) = (B, D + n_globals) for {spec.describe()} with "
                f"n_globals={self.n_globals}; got {tuple(x.shape)}"
            )
        b = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        elif t.dim() == 2 and t.shape[1] == 1:
            t = t.squeeze(1)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},) (or be a scalar); got {tuple(t.shape)}")
        if cond is not None:
            if self.cond_in is None:
                raise ValueError("this model was built with cond_dim=0 but got a cond tensor")
            if cond.shape != (b, self.cond_dim):
                raise ValueError(f"cond must have shape ({b}, {self.cond_dim}); got {tuple(cond.shape)}")
        return t, cond

    # ---------------------------------------------------------------------------------------- forward
    @property
    def anchored(self) -> bool:
        return self.node_anchor_value is not None

    @staticmethod
    def _graph_values(x: Tensor, topo: _Topology) -> tuple[Tensor, Tensor]:
        """``(nodes (B, N), edges (B, E))``: biases (zeros on input neurons) and weights in graph order."""
        f = topo.graph.flat_to_graph(x[:, : topo.num_params])
        return f.nodes.squeeze(-1), f.edges.squeeze(-1)

    def forward(
        self, x: Tensor, t: Tensor | float, cond: Tensor | None = None, spec: NetworkSpec | None = None,
        anchor: Tensor | None = None,
    ) -> Tensor:
        """Predict x1.

        Args:
            x: ``(B, D + n_globals)`` spec-ordered flat parameters followed by the global coordinates
                (``D`` of ``spec``).
            t: ``(B,)`` flow time in ``[0, 1]`` (a scalar is broadcast).
            cond: ``(B, cond_dim)`` task embedding, or None (treated as zeros).
            spec: architecture of the networks in ``x`` (default: the model's own). Hidden widths and, where
                :func:`layer_map` allows, depth may differ from the model's spec; input/output sizes may not
                (``ValueError``).
            anchor: ``(D + n_globals,)`` or ``(B, D + n_globals)`` anchor network, in x's layout (models built
                with ``anchor=True`` only, and then required).

        Returns:
            ``(B, D + n_globals)`` in the same layout.
        """
        if spec is not None and spec != self.spec:
            self.check_spec(spec)
        else:
            spec = self.spec
        t, cond = self._check_inputs(x, t, cond, spec)
        if self.anchored != (anchor is not None):
            raise ValueError("this model was built with anchor=True and needs an anchor network" if self.anchored
                             else "this model was built without anchor=True but got an anchor")
        if anchor is not None:
            if anchor.dim() == 1:
                anchor = anchor.unsqueeze(0)
            if anchor.shape[-1] != x.shape[1] or anchor.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"anchor must have shape ({x.shape[1]},) or ({x.shape[0]}, {x.shape[1]}); "
                                 f"got {tuple(anchor.shape)}")
        topo = self.topology(spec, x.device)
        b, d, big_d = x.shape[0], self.d_model, spec.num_params
        # conditioning vector
        c = self.time_mlp(sinusoidal_embedding(t, d))
        if self.cond_in is not None:  # cond=None means a zero task embedding
            c = c + (self.cond_in(cond) if cond is not None else self.cond_in.bias)
        c = F.gelu(c)
        # graph features: values embedded per layer, plus positions and globals
        nodes_x, edges_x = self._graph_values(x, topo)
        node_base = self._node_positions(topo).unsqueeze(0)
        edge_base = topo.edges_of(self.edge_layer_emb).unsqueeze(0)
        if self.globals_in is not None:
            g_node, g_edge = self.globals_in(x[:, big_d:]).unsqueeze(1).split([d, self.d_edge], dim=-1)
            node_base, edge_base = node_base + g_node, edge_base + g_edge
        h = torch.addcmul(node_base, nodes_x.unsqueeze(-1), topo.nodes_of(self.node_value))
        e = torch.addcmul(edge_base, edges_x.unsqueeze(-1), topo.edges_of(self.edge_value))
        if anchor is not None:
            nodes_a, edges_a = self._graph_values(anchor.to(x.dtype), topo)
            h = torch.addcmul(h, nodes_a.unsqueeze(-1), topo.nodes_of(self.node_anchor_value))
            e = torch.addcmul(e, edges_a.unsqueeze(-1), topo.edges_of(self.edge_anchor_value))
        # layers
        # activation checkpointing relies on saved-tensor hooks, which torch.func transforms (the likelihood's
        # vjp / jacrev of the field) do not support: inside one, layers run plainly
        recompute = torch.is_grad_enabled() and _functorch_level() is None and (
            self.checkpoint is True
            or (self.checkpoint == "auto" and b * topo.num_edges * self.d_edge >= AUTO_CHECKPOINT_ELEMENTS)
        )
        for layer in self.layers:
            if recompute:
                h, e = _checkpoint(layer, h, e, c, topo, self.backend, use_reentrant=False)
            else:
                h, e = layer(h, e, c, topo, self.backend)
        # readout
        g_n, s_n, g_e, s_e = self.final_mod(c).split([d, d, self.d_edge, self.d_edge], dim=-1)
        h_hat, e_hat = self.final_node_norm(h), self.final_edge_norm(e)
        node_out = _film_linear(h_hat, g_n, s_n, self.node_head.weight, self.node_head.bias)  # (B, N, L+1)
        edge_out = _film_linear(e_hat, g_e, s_e, self.edge_head.weight, self.edge_head.bias)  # (B, E, L)
        parts = []
        lin, neu = topo.linear_src, topo.neuron_src
        for i in range(spec.num_layers):
            parts.append(edge_out[:, topo.edge_offsets[i] : topo.edge_offsets[i + 1], lin[i]])
            parts.append(node_out[:, topo.node_offsets[i + 1] : topo.node_offsets[i + 2], neu[i + 1]])
        if self.globals_out is not None:
            pooled_h = h_hat.mean(1) * (1 + g_n) + s_n
            pooled_e = e_hat.mean(1) * (1 + g_e) + s_e
            parts.append(self.globals_out(torch.cat([pooled_h, pooled_e], -1)))
        return torch.cat(parts, 1)
