"""Relational Transformer vector field: equivariance (and its sensitivity), conditioning, gradients, sparsity."""

import contextlib

import pytest
import torch

from metaflow_ws.graph import neural_graph
from metaflow_ws.models import RelationalTransformer, sinusoidal_embedding
from metaflow_ws.models import relational_transformer as rt_module
from metaflow_ws.nets import NetworkSpec

F64 = torch.float64
SPEC = NetworkSpec((5, 4, 3, 2))
BACKENDS = ["blocks", "scatter"]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(spec=SPEC, seed=0, **kw) -> RelationalTransformer:
    torch.manual_seed(seed)  # nn.Module initialisation draws from the global generator
    kw = {"d_model": 16, "num_layers": 2} | kw
    return RelationalTransformer(spec, **kw).to(F64)


def _inputs(spec, batch, n_globals=0, seed=1):
    g = _gen(seed)
    x = torch.randn(batch, spec.num_params + n_globals, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64)
    return x, t


def _permute_flat(spec, x, perms, coupled=True):
    """Permute hidden neurons in flat coordinates (globals untouched). ``coupled=False`` permutes the rows of
    W_{l-1} and b_{l-1} but not the columns of W_l — a wrong permutation that changes the network's function."""
    d = spec.num_params
    p = dict(spec.unflatten(x[:, :d]))
    for layer, perm in perms.items():
        p[f"layers.{layer - 1}.weight"] = p[f"layers.{layer - 1}.weight"][:, perm]
        p[f"layers.{layer - 1}.bias"] = p[f"layers.{layer - 1}.bias"][:, perm]
        if coupled:
            p[f"layers.{layer}.weight"] = p[f"layers.{layer}.weight"][:, :, perm]
    return torch.cat([spec.flatten(p), x[:, d:]], dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_globals,cond_dim", [(0, 0), (1, 3)])
def test_output_shape_and_dtype(backend, n_globals, cond_dim):
    m = _model(n_globals=n_globals, cond_dim=cond_dim, backend=backend)
    x, t = _inputs(SPEC, 3, n_globals)
    cond = torch.randn(3, cond_dim, dtype=F64) if cond_dim else None
    y = m(x, t, cond)
    assert y.shape == x.shape == (3, SPEC.num_params + n_globals) and y.dtype == F64
    assert torch.isfinite(y).all()
    assert m.dim == SPEC.num_params + n_globals


@pytest.mark.parametrize("backend", BACKENDS)
def test_equivariant_to_hidden_permutations(backend):
    spec = NetworkSpec((5, 4, 3, 3, 2))
    m = _model(spec, n_globals=1, cond_dim=2, heads=2, d_edge=8, backend=backend)
    with torch.no_grad():  # make the conditioning path non-trivial too
        m.cond_in.weight.normal_(generator=_gen(5))
    x, t = _inputs(spec, 3, 1)
    cond = torch.randn(3, 2, generator=_gen(6), dtype=F64)
    g = _gen(7)
    perms = {l: torch.randperm(spec.widths[l], generator=g) for l in (1, 2, 3)}
    y = m(x, t, cond)
    y_perm = m(_permute_flat(spec, x, perms), t, cond)
    torch.testing.assert_close(y_perm, _permute_flat(spec, y, perms), rtol=0, atol=1e-10)
    assert (y_perm - y).abs().max() > 1e-3  # the permutation did move things


@pytest.mark.parametrize("backend", BACKENDS)
def test_uncoupled_permutation_changes_output(backend):
    m = _model(backend=backend)
    x, t = _inputs(SPEC, 2)
    perms = {1: torch.tensor([1, 0, 3, 2])}
    y = m(x, t)
    y_wrong = m(_permute_flat(SPEC, x, perms, coupled=False), t)
    assert (y_wrong - _permute_flat(SPEC, y, perms, coupled=False)).abs().max() > 1e-3
    assert (y_wrong - _permute_flat(SPEC, y, perms)).abs().max() > 1e-3


def test_input_and_output_neurons_are_not_exchangeable():
    """Inputs and outputs have fixed identities: permuting input features is not a symmetry of the model."""
    m = _model()
    x, t = _inputs(SPEC, 2)
    p = dict(SPEC.unflatten(x))
    perm = torch.tensor([1, 0, 2, 3, 4])
    p["layers.0.weight"] = p["layers.0.weight"][:, :, perm]
    y_perm = SPEC.unflatten(m(SPEC.flatten(p), t))["layers.0.weight"][:, :, perm]  # undo on the output
    assert (y_perm - SPEC.unflatten(m(x, t))["layers.0.weight"]).abs().max() > 1e-3


def test_backends_compute_the_same_function():
    spec = NetworkSpec((6, 5, 4, 3))
    a = _model(spec, n_globals=1, heads=4, d_edge=12, d_edge_hidden=20, backend="blocks")
    b = _model(spec, n_globals=1, heads=4, d_edge=12, d_edge_hidden=20, backend="scatter")
    b.load_state_dict(a.state_dict())
    x, t = _inputs(spec, 4, 1)
    torch.testing.assert_close(a(x, t), b(x, t), rtol=0, atol=1e-12)
    ga = torch.autograd.grad(a(x, t).square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(b(x, t).square().sum(), list(b.parameters()))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


def test_backends_agree_under_bfloat16_autocast():
    # bfloat16 autocast (what `train --precision bf16` wraps the field in) runs on both backends, within bf16 rounding
    spec = NetworkSpec((6, 5, 4, 3))
    a = _model(spec, n_globals=1, backend="blocks").float()
    b = _model(spec, n_globals=1, backend="scatter").float()
    b.load_state_dict(a.state_dict())
    x, t = (v.float() for v in _inputs(spec, 4, 1))
    ref = a(x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = a(x, t).float(), b(x, t).float()
    tol = 0.05 * ref.abs().max().item()
    assert (ya - ref).abs().max() < tol and (yb - ref).abs().max() < tol
    assert (ya - ref).abs().max() > 0  # it really ran in reduced precision
    yb.square().sum().backward()  # and differentiates
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in b.parameters() if p.requires_grad)


def test_time_changes_output():
    m = _model()
    x, t = _inputs(SPEC, 2)
    assert (m(x, t) - m(x, t + 0.3)).abs().max() > 1e-4
    # a scalar t is broadcast over the batch
    torch.testing.assert_close(m(x, 0.25), m(x, torch.full((2,), 0.25, dtype=F64)))


def test_cond_starts_as_identity_and_then_matters():
    m = _model(cond_dim=3)
    x, t = _inputs(SPEC, 2)
    cond = torch.randn(2, 3, generator=_gen(2), dtype=F64)
    y0 = m(x, t)
    assert torch.equal(m(x, t, cond), y0)  # zero-initialised FiLM hook
    torch.testing.assert_close(m(x, t, torch.zeros(2, 3, dtype=F64)), y0)
    # one optimizer step on a cond-dependent loss makes cond matter
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x, t, cond).square().sum().backward()
    assert m.cond_in.weight.grad.abs().max() > 0
    opt.step()
    assert (m(x, t, cond) - m(x, t)).abs().max() > 1e-6
    assert (m(x, t, cond) - m(x, t, -cond)).abs().max() > 1e-6
    torch.testing.assert_close(m(x, t), m(x, t, torch.zeros(2, 3, dtype=F64)))  # None means zeros


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_reach_every_parameter(backend):
    m = _model(n_globals=1, cond_dim=2, backend=backend)
    x, t = _inputs(SPEC, 3, 1)
    x.requires_grad_(True)
    m(x, t, torch.randn(3, 2, dtype=F64)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    assert x.grad.abs().max() > 0


@pytest.mark.parametrize("backend", ["blocks", "scatter"])
def test_backward_is_bitwise_reproducible(backend):
    """Per-layer embeddings expand block by block, so their gradients are block sums: two backward passes give
    bit-identical gradients (the advanced-indexing backward accumulated with CPU-threaded atomic adds, and flow
    trainings of one seed drifted apart within tens of steps). A graph with ~25K edges so that the old path ran
    in parallel. The scatter backend's ``index_add`` / ``index_select`` backward and torch-geometric softmax are
    deterministic on CPU too."""
    spec = NetworkSpec((100, 200, 24, 2))
    m = RelationalTransformer(spec, d_model=8, num_layers=1, backend=backend).float()
    x = torch.randn(2, spec.num_params, generator=_gen(0))
    t = torch.rand(2, generator=_gen(1))

    def grads():
        m.zero_grad(set_to_none=True)
        m(x, t).square().sum().backward()
        return {k: p.grad.clone() for k, p in m.named_parameters()}

    with _threads(2):
        a, b = grads(), grads()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def test_checkpointing_matches_plain_backward(monkeypatch):
    a = _model(checkpoint=False)
    b = _model(checkpoint=True)
    c = _model(checkpoint="auto")
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    x, t = _inputs(SPEC, 2)
    calls = []
    real = rt_module._checkpoint
    monkeypatch.setattr(rt_module, "_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    ya = a(x, t)
    assert not calls
    yb = b(x, t)
    assert len(calls) == 2  # one per layer
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.sum(), list(a.parameters()))
    gb = torch.autograd.grad(yb.sum(), list(b.parameters()))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)
    # "auto": off for small graphs, on once B·E·d_edge reaches the threshold
    calls.clear()
    c(x, t)
    assert not calls
    monkeypatch.setattr(rt_module, "AUTO_CHECKPOINT_ELEMENTS", 1)
    torch.testing.assert_close(c(x, t), ya)
    assert len(calls) == 2
    calls.clear()
    with torch.no_grad():
        c(x, t)
    assert not calls  # never when no gradients are recorded
    # nor inside torch.func transforms (no saved-tensor hooks there): the likelihood takes a vjp of the field,
    # which raised "don't yet support saved tensor hooks" on a large (auto-checkpointed) graph
    from torch.func import vjp

    out, pull = vjp(lambda z: b(z, t), x)
    (gx,) = pull(torch.ones_like(out))
    assert not calls
    torch.testing.assert_close(out, ya)
    torch.testing.assert_close(gx, torch.autograd.grad(a(x.requires_grad_(), t).sum(), x)[0])


def test_mnist_sized_graph_stays_sparse():
    """784-10-10 (7,940 edges, 804 nodes) trains without any N×N-sized tensor."""
    spec = NetworkSpec((784, 10, 10))
    g = neural_graph(spec)
    n, e, b, d = g.num_nodes, g.num_edges, 2, 8
    torch.manual_seed(0)
    m = RelationalTransformer(spec, d_model=d, num_layers=1, n_globals=1)
    x = torch.randn(b, spec.num_params + 1)
    t = torch.rand(b)
    with torch.profiler.profile(record_shapes=True) as prof:
        y = m(x, t)
        y.square().mean().backward()
    assert y.shape == x.shape and torch.isfinite(y).all()
    largest = max(
        (torch.Size(s).numel() for ev in prof.events() for s in ev.input_shapes if isinstance(s, list) and s),
        default=0,
    )
    assert largest <= 4 * b * e * d  # O(E·d) …
    assert largest < b * n * n  # … far from one N×N matrix per network


def test_sinusoidal_embedding():
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = sinusoidal_embedding(t, 7)
    assert emb.shape == (3, 7) and torch.all(emb[:, -1] == 0)
    torch.testing.assert_close(emb[0, :3], torch.ones(3))  # cos(0)


def test_errors_name_expected_and_got():
    m = _model(n_globals=1)
    x, t = _inputs(SPEC, 2, 1)
    with pytest.raises(ValueError, match=rf"\(B, {SPEC.num_params + 1}\).*got \(2, {SPEC.num_params}\)"):
        m(x[:, :-1], t)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\).*got \(3,\)"):
        m(x, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="cond_dim=0"):
        m(x, t, torch.zeros(2, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 3\).*got \(2, 4\)"):
        _model(cond_dim=3)(x[:, :-1], t, torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="divisible by heads"):
        RelationalTransformer(SPEC, d_model=10, heads=3)
    with pytest.raises(ValueError, match="unknown backend"):
        RelationalTransformer(SPEC, backend="dense")
    with pytest.raises(ValueError, match="checkpoint must be"):
        RelationalTransformer(SPEC, checkpoint="sometimes")


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_is_permuted_jointly_and_breaks_the_symmetry_of_x_alone(backend):
    spec = NetworkSpec((5, 4, 3, 3, 2))
    m = _model(spec, n_globals=1, anchor=True, backend=backend)
    x, t = _inputs(spec, 3, 1)
    anchor = torch.randn(1, spec.num_params + 1, generator=_gen(8), dtype=F64)
    g = _gen(9)
    perms = {l: torch.randperm(spec.widths[l], generator=g) for l in (1, 2, 3)}
    y = m(x, t, anchor=anchor)
    # x and anchor permuted together: the output permutes the same way (equivariance kept)
    y_joint = m(_permute_flat(spec, x, perms), t, anchor=_permute_flat(spec, anchor, perms))
    torch.testing.assert_close(y_joint, _permute_flat(spec, y, perms), rtol=0, atol=1e-10)
    # x permuted under a fixed anchor: no longer equivariant, the anchor tells neurons apart
    y_x_only = m(_permute_flat(spec, x, perms), t, anchor=anchor)
    assert (y_x_only - _permute_flat(spec, y, perms)).abs().max() > 1e-3
    # a (D,) anchor broadcasts like a (1, D) one; per-sample anchors are accepted
    torch.testing.assert_close(m(x, t, anchor=anchor[0]), y, rtol=0, atol=0)
    assert m(x, t, anchor=anchor.expand(3, -1)).shape == y.shape


def test_anchor_errors():
    plain, anchored = _model(), _model(anchor=True)
    x, t = _inputs(SPEC, 2)
    with pytest.raises(ValueError, match="needs an anchor network"):
        anchored(x, t)
    with pytest.raises(ValueError, match="without anchor=True"):
        plain(x, t, anchor=x[0])
    with pytest.raises(ValueError, match=r"anchor must have shape \(%d,\)" % SPEC.num_params):
        anchored(x, t, anchor=x[:, :-1])
