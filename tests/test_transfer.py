"""Architecture transfer (Relational Transformer and flows on other hidden widths) and the `transfer` command."""

from __future__ import annotations

import json

import pytest
import torch

from metaflow_ws.flows import FlowConfig, SampleConfig, TrainConfig, WeightFlow, sample, train_flow
from metaflow_ws.models import RelationalTransformer
from metaflow_ws.nets import NetworkSpec

F64 = torch.float64
SPEC = NetworkSpec((5, 3, 4, 2))
WIDE = NetworkSpec((5, 7, 6, 2))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(spec=SPEC, seed=0, **kw) -> RelationalTransformer:
    torch.manual_seed(seed)
    kw = {"d_model": 16, "num_layers": 2, "n_globals": 1, "cond_dim": 2} | kw
    return RelationalTransformer(spec, **kw).to(F64)


def _permute_flat(spec, x, perms, coupled=True):
    d = spec.num_params
    p = dict(spec.unflatten(x[:, :d]))
    for layer, perm in perms.items():
        p[f"layers.{layer - 1}.weight"] = p[f"layers.{layer - 1}.weight"][:, perm]
        p[f"layers.{layer - 1}.bias"] = p[f"layers.{layer - 1}.bias"][:, perm]
        if coupled:
            p[f"layers.{layer}.weight"] = p[f"layers.{layer}.weight"][:, :, perm]
    return torch.cat([spec.flatten(p), x[:, d:]], dim=1)


@pytest.mark.parametrize("backend", ["blocks", "scatter"])
def test_rt_on_a_wider_spec_is_permutation_equivariant(backend):
    m = _model(backend=backend)
    with torch.no_grad():
        m.cond_in.weight.normal_(generator=_gen(5))
    g = _gen(1)
    x = torch.randn(3, WIDE.num_params + 1, generator=g, dtype=F64)
    t = torch.rand(3, generator=g, dtype=F64)
    cond = torch.randn(3, 2, generator=g, dtype=F64)
    perms = {1: torch.randperm(7, generator=g), 2: torch.randperm(6, generator=g)}
    y = m(x, t, cond, spec=WIDE)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y_perm = m(_permute_flat(WIDE, x, perms), t, cond, spec=WIDE)
    torch.testing.assert_close(y_perm, _permute_flat(WIDE, y, perms), rtol=0, atol=1e-10)
    assert (y_perm - y).abs().max() > 1e-3
    y_wrong = m(_permute_flat(WIDE, x, perms, coupled=False), t, cond, spec=WIDE)
    assert (y_wrong - _permute_flat(WIDE, y, perms)).abs().max() > 1e-3  # an uncoupled permutation is not a symmetry


def test_new_path_on_the_same_spec_is_bit_identical():
    """A model built for WIDE, run on SPEC through the new per-spec topology, equals the model built for SPEC."""
    a = _model(SPEC)
    b = _model(WIDE, seed=3)
    b.load_state_dict(a.state_dict())  # the parameters do not depend on hidden widths
    g = _gen(2)
    x = torch.randn(4, SPEC.num_params + 1, generator=g, dtype=F64)
    t = torch.rand(4, generator=g, dtype=F64)
    y = a(x, t)
    assert torch.equal(b(x, t, spec=SPEC), y)
    assert torch.equal(a(x, t, spec=SPEC), y)
    assert b.topology(SPEC) is b.topology(SPEC)  # cached per spec
    assert set(b.state_dict()) == set(a.state_dict())  # cached topologies are not persisted


def test_wrong_depth_or_io_sizes_are_clear_errors():
    m = _model()
    for spec, what in [(NetworkSpec((6, 3, 4, 2)), "inputs"), (NetworkSpec((5, 3, 4, 3)), "outputs")]:
        x = torch.zeros(1, spec.num_params + 1, dtype=F64)
        with pytest.raises(ValueError, match=rf"MLP 5-3-4-2.*{what}.*{spec.describe().split()[1]}"):
            m(x, 0.5, spec=spec)
    none = NetworkSpec((5, 2))
    with pytest.raises(ValueError, match="MLP 5-3-4-2.*MLP 5-2.*needs a hidden layer"):
        m(torch.zeros(1, none.num_params + 1, dtype=F64), 0.5, spec=none)
    shallow = _model(NetworkSpec((5, 3, 2)))  # no hidden-to-hidden layer to lend a deeper network
    deep = NetworkSpec((5, 3, 3, 2))
    with pytest.raises(ValueError, match="MLP 5-3-2.*no hidden-to-hidden.*MLP 5-3-3-2.*two or more hidden"):
        shallow(torch.zeros(1, deep.num_params + 1, dtype=F64), 0.5, spec=deep)
    with pytest.raises(ValueError, match=r"\(B, 105\).*MLP 5-7-6-2"):
        m(torch.zeros(1, 10, dtype=F64), 0.5, spec=WIDE)


def test_layer_map_keeps_the_ends_and_stretches_the_interior():
    from metaflow_ws.models.relational_transformer import layer_map

    own = NetworkSpec((30, 16, 16, 2))
    assert layer_map(own, NetworkSpec((30, 8, 8, 2))) == ((0, 1, 2), (0, 1, 2, 3))  # same depth: identity
    # deeper: both hidden-to-hidden layers continue the one the field learned; first/last hidden neurons keep theirs
    assert layer_map(own, NetworkSpec((30, 16, 16, 16, 2))) == ((0, 1, 1, 2), (0, 1, 2, 2, 3))
    assert layer_map(own, NetworkSpec((30, 16, 2))) == ((0, 2), (0, 2, 3))  # shallower: no interior layer left
    assert layer_map(NetworkSpec((30, 9, 9, 9, 9, 2)), NetworkSpec((30, 9, 9, 2))) == ((0, 2, 4), (0, 1, 4, 5))


DEEP = NetworkSpec((5, 3, 4, 6, 2))


@pytest.mark.parametrize("backend", ["blocks", "scatter"])
def test_rt_on_a_deeper_spec_is_permutation_equivariant(backend):
    """The field of a 5-3-4-2 model run on 5-3-4-6-2 networks: every hidden layer, the new one included, stays
    exchangeable, and the deeper network's first and last layers read out through the model's first and last heads."""
    m = _model(backend=backend)
    g = _gen(4)
    x = torch.randn(3, DEEP.num_params + 1, generator=g, dtype=F64)
    t = torch.rand(3, generator=g, dtype=F64)
    perms = {1: torch.randperm(3, generator=g), 2: torch.randperm(4, generator=g), 3: torch.randperm(6, generator=g)}
    y = m(x, t, spec=DEEP)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(m(_permute_flat(DEEP, x, perms), t, spec=DEEP), _permute_flat(DEEP, y, perms),
                               rtol=0, atol=1e-10)
    topo = m.topology(DEEP)
    assert topo.linear_src == (0, 1, 1, 2) and topo.neuron_src == (0, 1, 2, 2, 3)
    # zeroing the model's middle weight head zeroes exactly the weights of both interior layers
    with torch.no_grad():
        m.edge_head.weight[1].zero_()
        m.edge_head.bias[1].zero_()
    y = m(x, t, spec=DEEP)
    o = DEEP.offsets
    for name in ("layers.1.weight", "layers.2.weight"):
        a, b = o[name]
        assert y[:, a:b].abs().max() < 1e-12, name
    for name in ("layers.0.weight", "layers.3.weight"):
        a, b = o[name]
        assert y[:, a:b].abs().max() > 1e-3, name


@pytest.fixture(scope="module")
def flows(tiny_bc_zoo):
    out = {}
    for kind in ("euclidean", "geometric"):
        cfg = FlowConfig(flow=kind, widths=tiny_bc_zoo.spec.widths, task="breast_cancer", d_model=8, num_layers=1)
        out[kind] = train_flow(tiny_bc_zoo, cfg, TrainConfig(steps=3, batch_size=8, align=False)).flow
    return out


@pytest.mark.parametrize("kind", ["euclidean", "geometric"])
def test_flow_for_spec(flows, kind, tmp_path):
    flow = flows[kind]
    spec = NetworkSpec((30, 32, 8, 2))
    assert flow.for_spec(flow.spec) is flow
    wide = flow.for_spec(spec)
    assert wide.spec == spec and wide.field is flow.field
    assert wide.dim == spec.num_params + flow.coords.n_globals
    # fan-in rule for weight blocks, biases and globals unchanged
    o, n = flow.spec.offsets, spec.offsets
    for i, (fan_old, fan_new) in enumerate([(30, 30), (16, 32), (16, 8)]):
        a, c = o[f"layers.{i}.weight"][0], n[f"layers.{i}.weight"][0]
        torch.testing.assert_close(wide.scale[c], flow.scale[a] * (fan_old / fan_new) ** 0.5)
        torch.testing.assert_close(wide.scale[n[f"layers.{i}.bias"][0]], flow.scale[o[f"layers.{i}.bias"][0]])
    # same RNG stream, same samples as sample(..., spec=); samples decode to real networks of the new spec
    x = sample(wide, 3, SampleConfig(steps=3), generator=_gen(0))
    x2 = sample(flow, 3, SampleConfig(steps=3), generator=_gen(0), spec=spec)
    assert torch.equal(x, x2) and x.shape == (3, wide.dim)
    params = wide.decode(x)
    assert params["layers.0.weight"].shape == (3, 32, 30) and all(torch.isfinite(v).all() for v in params.values())
    # old path unchanged: sample(..., spec=own spec) is bit-identical
    assert torch.equal(sample(flow, 3, SampleConfig(steps=3), generator=_gen(1)),
                       sample(flow, 3, SampleConfig(steps=3), generator=_gen(1), spec=flow.spec))
    # a transferred flow saves and reloads as a flow of the new spec
    wide.save_pretrained(tmp_path / "wide")
    again = WeightFlow.from_pretrained(tmp_path / "wide")
    assert again.spec == spec
    assert torch.equal(sample(again, 3, SampleConfig(steps=3), generator=_gen(0)), x)


@pytest.mark.parametrize("kind", ["euclidean", "geometric"])
def test_flow_for_spec_to_another_depth(flows, kind, tmp_path):
    flow = flows[kind]
    for spec, src in [(NetworkSpec((30, 16, 16, 16, 2)), (0, 1, 1, 2)), (NetworkSpec((30, 12, 2)), (0, 2))]:
        f = flow.for_spec(spec)
        assert f.spec == spec and f.field is flow.field and f.config.field_widths == (30, 16, 16, 2)
        o, n = flow.spec.offsets, spec.offsets
        for i, j in enumerate(src):  # each layer takes the scale of the layer it continues, with the fan-in rule
            torch.testing.assert_close(f.scale[n[f"layers.{i}.weight"][0]],
                                       flow.scale[o[f"layers.{j}.weight"][0]] * (flow.spec.widths[j] / spec.widths[i]) ** 0.5)
            torch.testing.assert_close(f.scale[n[f"layers.{i}.bias"][0]], flow.scale[o[f"layers.{j}.bias"][0]])
        x = sample(f, 3, SampleConfig(steps=3), generator=_gen(0))
        params = f.decode(x)
        assert [params[f"layers.{i}.weight"].shape[1:] for i in range(spec.num_layers)] == \
            [(spec.widths[i + 1], spec.widths[i]) for i in range(spec.num_layers)]
        assert all(torch.isfinite(v).all() for v in params.values())
        # it saves and reloads as a flow of the new depth whose field keeps the source's layers
        f.save_pretrained(tmp_path / f"d{spec.num_layers}")
        again = WeightFlow.from_pretrained(tmp_path / f"d{spec.num_layers}")
        assert again.spec == spec and again.field.spec == flow.spec
        assert torch.equal(sample(again, 3, SampleConfig(steps=3), generator=_gen(0)), x)


def test_flow_for_spec_errors(flows):
    flow = flows["geometric"]
    with pytest.raises(ValueError, match="MLP 30-16-16-2.*MLP 30-2.*needs a hidden layer"):
        flow.for_spec(NetworkSpec((30, 2)))
    with pytest.raises(ValueError, match="MLP 30-16-16-2.*outputs.*MLP 30-16-16-3"):
        flow.for_spec(NetworkSpec((30, 16, 16, 3)))
    with pytest.raises(ValueError, match="another activation"):
        flow.for_spec(NetworkSpec((30, 8, 8, 2), "tanh"))
    with pytest.raises(ValueError, match="flow.for_spec"):
        flow.check_spec(NetworkSpec((30, 8, 8, 2)))


def test_transfer_cli_end_to_end(tmp_path, capsys):
    from metaflow_ws.cli import main

    out = tmp_path / "transfer"
    rc = main(["transfer", "--out", str(out), "--preset", "tiny", "--json", "--device", "cpu", "--layers", "2",
               "--precision", "bf16"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["out"] == str(out)
    text = (out / "README.md").read_text()
    assert "metaflow-ws transfer --out" in text and "Goals" in text
    data = json.loads((out / "results.json").read_text())
    assert {"task_transfer", "learned_init", "architecture_transfer", "command", "seeds"} <= set(data)
    for name in ("guidance_sweep.png", "init_curves.png", "architecture_transfer.png"):
        assert (out / name).stat().st_size > 1000
    assert data["config"]["coupling"] == "ot-perm" and "coupling ot-perm" in text
    assert (data["config"]["d_model"], data["config"]["num_layers"]) == (8, 2) and "RT d=8 × 2" in text
    assert data["config"]["precision"] == "bf16"
    assert not any(s["flow_reused"] for s in data["sources"].values())
    # --reuse loads the saved source flow instead of retraining it: the same flow, so the same sweep
    capsys.readouterr()
    assert main(["transfer", "--out", str(out), "--preset", "tiny", "--json", "--device", "cpu", "--layers", "2",
                 "--precision", "bf16", "--reuse"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert all(s["flow_reused"] for s in again["sources"].values())
    assert again["sources"]["digits"]["flow_seconds"] == data["sources"]["digits"]["flow_seconds"]
    for a, b in zip(data["task_transfer"][0]["sweep"], again["task_transfer"][0]["sweep"], strict=True):
        assert a["accuracy_mean"] == pytest.approx(b["accuracy_mean"], abs=1e-6)
    assert "| yes |" in (out / "README.md").read_text()
    assert main(["transfer", "--out", str(out), "--preset", "tiny", "--coupling", "nope"]) == 2
    assert "unknown coupling 'nope'" in capsys.readouterr().err
    # the source flows train without path noise (it resists guidance) at train's lr (1e-2); another σ or lr is
    # another flow: --reuse retrains
    assert data["config"]["path_noise"] == 0.0 and "coupling ot-perm, path noise 0, lr 0.01 |" in text
    assert json.loads((out / "flows" / "digits" / "config.json").read_text())["train"]["lr"] == TrainConfig.lr
    capsys.readouterr()
    assert main(["transfer", "--out", str(out), "--preset", "tiny", "--json", "--device", "cpu", "--layers", "2",
                 "--precision", "bf16", "--reuse", "--path-noise", "0.3", "--flow-lr", "0.002"]) == 0
    noisy = json.loads((out / "results.json").read_text())
    assert noisy["config"]["path_noise"] == 0.3 and not any(s["flow_reused"] for s in noisy["sources"].values())
    assert "coupling ot-perm, path noise 0.3, lr 0.002 |" in (out / "README.md").read_text()
    assert json.loads((out / "flows" / "digits" / "config.json").read_text())["train"]["lr"] == 0.002
    assert main(["transfer", "--out", str(out), "--preset", "tiny", "--path-noise", "-1"]) == 2
    assert "path_noise must be a finite number ≥ 0" in capsys.readouterr().err
    assert main(["transfer", "--out", str(out), "--preset", "tiny", "--flow-lr", "0"]) == 2
    assert "flow_lr must be a finite number > 0; got 0.0" in capsys.readouterr().err


def test_normalized_guidance_steps_have_length_lambda_dt_and_lower_the_loss(flows, monkeypatch):
    from metaflow_ws import get_task
    from metaflow_ws.evaluation import batch_metrics

    flow = flows["euclidean"]
    monkeypatch.setattr(flow, "velocity", lambda x, t, cond=None: torch.zeros_like(x))  # guidance alone
    x, y = get_task("breast_cancer").data(0).split("train")
    x0 = flow.sample_prior(5, generator=_gen(0))
    states = [x0]
    cfg = SampleConfig(steps=10, guidance=0.5, guidance_normalize=True)
    out = sample(flow, 5, cfg, x0=x0, guidance_data=(x, y, "classification"),
                 callback=lambda i, xc: states.append(xc.clone()))
    steps = torch.stack([b - a for a, b in zip(states[:-1], states[1:])])  # [10, 5, D]
    from metaflow_ws.flows import time_grid

    dt = time_grid(10, cfg.rho).diff().float()  # the default grid's steps
    torch.testing.assert_close(steps.norm(dim=-1), (0.5 * dt)[:, None].expand(10, 5))  # λ·dt, whatever the gradient
    loss = [batch_metrics(flow.spec, flow.decode(z), x, y, "classification")["loss"] for z in (x0, out)]
    assert (loss[1] < loss[0]).all()


@pytest.mark.parametrize("at", ["x", "x1"])
def test_guidance_at_takes_the_gradient_at_x_t_or_at_the_prediction(flows, monkeypatch, at):
    """One Euler step from t = 0 with x̂1 fixed to a network c lands at c − λ·ĝ, where ĝ is the unit task-loss
    gradient at x0 (``guidance_at="x"``) or at c (``"x1"``): a closed form for each."""
    from metaflow_ws import get_task
    from metaflow_ws.flows.sampling import guidance_gradient

    flow = flows["euclidean"]
    x, y = get_task("breast_cancer").data(0).split("train")
    x0, c = flow.sample_prior(4, generator=_gen(0)), flow.sample_prior(4, generator=_gen(1))
    monkeypatch.setattr(flow, "predict_x1", lambda xt, t, cond=None: c)
    out = sample(flow, 4, SampleConfig(steps=1, guidance=0.5, guidance_normalize=True, guidance_at=at), x0=x0,
                 guidance_data=(x, y, "classification"))
    g = guidance_gradient(flow, x0 if at == "x" else c, x, y, "classification")
    torch.testing.assert_close(out, c - 0.5 * g / g.norm(dim=1, keepdim=True))
    other = guidance_gradient(flow, c if at == "x" else x0, x, y, "classification")
    assert (out - (c - 0.5 * other / other.norm(dim=1, keepdim=True))).abs().max() > 1e-3  # the other point differs


def test_guidance_at_the_prediction_stays_on_the_manifold_and_lowers_the_loss(flows):
    from metaflow_ws import get_task
    from metaflow_ws.evaluation import batch_metrics

    flow = flows["geometric"]
    x, y = get_task("breast_cancer").data(0).split("train")
    plain = sample(flow, 6, SampleConfig(steps=8), generator=_gen(0))
    guided = sample(flow, 6, SampleConfig(steps=8, guidance=3.0, guidance_normalize=True, guidance_at="x1"),
                    generator=_gen(0), guidance_data=(x, y, "classification"))
    torch.testing.assert_close(flow.data_manifold.project(guided), guided)
    loss = [batch_metrics(flow.spec, flow.decode(z), x, y, "classification")["loss"].mean() for z in (plain, guided)]
    assert loss[1] < loss[0]
    with pytest.raises(ValueError, match=r"unknown guidance point 'x0'; expected one of \['x', 'x1'\]"):
        SampleConfig(guidance_at="x0")


def test_learned_init_warm_states_are_what_warm_start_sets(flows):
    """The experiment's vmapped optimizer states (groups of k candidates) equal, group by group, the state
    `warm_start` writes into torch's Adam and SGD for the same candidates and minibatches."""
    from metaflow_ws import get_task
    from metaflow_ws.experiments.transfer import TransferConfig, _warm_states
    from metaflow_ws.init import _set_state, candidate_gradients, resolve_support
    from metaflow_ws.train.optim import SGD, Adam

    flow = flows["geometric"]
    spec, s, k, m = flow.spec, 3, 4, 4
    cfg = TransferConfig.from_preset("tiny", init_batch=16)
    x, y = get_task("breast_cancer").data(0).split("train")
    support = resolve_support(data=(x[:64], y[:64]))
    cand = flow.decode(sample(flow, s * k, SampleConfig(steps=2), generator=_gen(1)))
    pick = torch.tensor([2, 0, 3])
    states = _warm_states(spec, cand, pick, support, cfg, Adam(lr=1e-3),
                          SGD(lr=0.1, momentum=0.9, weight_decay=1e-3))
    grads = candidate_gradients(spec, cand, support, grad_batches=m, batch_size=16, generator=_gen(cfg.seed + 106))
    for i in range(s):
        rows = slice(i * k, (i + 1) * k)
        for opt_cls, kw, keys in [(torch.optim.Adam, {"lr": 1e-3}, {"m": "exp_avg", "v": "exp_avg_sq"}),
                                  (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
                                   {"buf": "momentum_buffer"})]:
            params = {n: torch.nn.Parameter(v[rows][int(pick[i])].clone()) for n, v in cand.items()}
            opt = opt_cls(list(params.values()), **kw)
            for n, p in params.items():  # what warm_start does for every parameter
                _set_state(opt, opt.param_groups[0], p, grads[n][rows], int(pick[i]), cand[n][rows], k * m)
            got = states["adam" if opt_cls is torch.optim.Adam else "sgd"]
            for ours, theirs in keys.items():
                ref = spec.flatten({n: opt.state[p][theirs][None] for n, p in params.items()})[0]
                torch.testing.assert_close(got[ours][i], ref)
            if opt_cls is torch.optim.Adam:
                assert int(got["t"]) == int(float(opt.state[params["layers.0.weight"]]["step"])) == k * m


def test_mnist1d_pair_follows_the_task_unless_overridden():
    from metaflow_ws.experiments.transfer import TransferConfig, _pairs
    from metaflow_ws.tasks import get_task

    task = get_task("mnist1d")
    pair = _pairs(TransferConfig.from_preset("full"))[1]
    assert pair.source.spec == task.spec == pair.target.spec and pair.zoo_runs == task.recipe.runs
    assert pair.source.recipe == task.recipe and pair.zoo_epochs is None  # the task's own SGD recipe and epochs
    assert pair.target.name == "mnist1d_shuffled[40-10-10,seed=1]"
    wide = _pairs(TransferConfig.from_preset("full", mnist1d_widths=(40, 32, 10), mnist1d_zoo_runs=7))[1]
    assert wide.source.spec == NetworkSpec((40, 32, 10)) == wide.target.spec and wide.zoo_runs == 7
    assert len(_pairs(TransferConfig.from_preset("full", mnist1d=False))) == 1


def test_findings_say_when_the_chosen_cell_is_on_the_edge_of_the_grid():
    from metaflow_ws.experiments.transfer import _grid_edge

    def row(lam, steps, method="flow", normalized=True, at="x"):
        return {"method": method, "guidance": lam, "steps": steps, "normalized": normalized, "guidance_at": at}

    sweep = [row(lam, st) for st in (32, 512) for lam in (0.0, 3.0, 30.0)]
    sweep += [row(100.0, 512, normalized=False), row(300.0, 512, method="guidance only")]  # not the flow grid
    tt = {"sweep": sweep, "best_guided": row(30.0, 512)}
    assert _grid_edge(tt) == ["λ=30 is the largest swept", "512 steps the most"]
    assert _grid_edge({**tt, "best_guided": row(3.0, 512)}) == ["512 steps the most"]
    assert _grid_edge({**tt, "best_guided": row(3.0, 32)}) == []
    # a grid with one step count has no steps edge to report
    one = {"sweep": [row(lam, 64) for lam in (3.0, 30.0)], "best_guided": row(30.0, 64)}
    assert _grid_edge(one) == ["λ=30 is the largest swept"]
    # a cell guided at x̂1 is judged on the x̂1 grid: λ=10 is its largest even where the x_t grid goes to 30
    both = {"sweep": sweep + [row(lam, 512, at="x1") for lam in (3.0, 10.0)], "best_guided": row(10.0, 512, at="x1")}
    assert _grid_edge(both) == ["λ=10 is the largest swept"]


def test_architecture_experiment_samples_other_widths_and_depths(flows, tmp_path, capsys):
    from metaflow_ws.experiments.architecture import main, source_task

    folder = tmp_path / "flow"
    flows["geometric"].save_pretrained(folder, extra=flows["geometric"].meta)
    out = tmp_path / "arch"
    assert main(["--flow", str(folder), "--widths", "30-8-2", "30-16-16-24-2", "--out", str(out), "-n", "4",
                 "--steps", "2", "--candidates", "2", "--trained-runs", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["architecture_transfer"]["rows"]
    assert [r["widths"] for r in rows] == [[30, 16, 16, 2], [30, 8, 2], [30, 16, 16, 24, 2]]
    assert [r["transferred"] for r in rows] == [False, True, True]
    for r in rows:
        for name in ("unguided", "guided", "guided, ∇ at x̂1", "guidance only", "trained"):
            assert 0.0 <= r[name]["accuracy_mean"] <= 1.0, (r["architecture"], name)
    text = (out / "README.md").read_text()
    assert "| MLP 30-16-16-24-2 (relu) |" in text and "other depths are in the table" in text
    # the Net2Net baseline: deeper and wider architectures can grow the own samples (their accuracies), narrower not
    grown = [line for line in text.splitlines() if "growing the flow's own samples" in line]
    own_unguided = f"{rows[0]['unguided']['accuracy_mean']:.3f} grown"
    assert len(grown) == 1 and "MLP 30-16-16-24-2" in grown[0] and own_unguided in grown[0]
    assert (out / "architecture_transfer.png").read_bytes()[:4] == b"\x89PNG"
    assert "python -m metaflow_ws.experiments.architecture --flow" in text
    # the recorded task resolves at the flow's widths; bad architectures fail before any work
    assert source_task(flows["geometric"]).name == "breast_cancer"
    assert main(["--flow", str(folder), "--widths", "31-8-2", "--out", str(tmp_path / "bad")]) == 2
    assert "31-8-2 must be positive, start with 30" in capsys.readouterr().err
    assert main(["--flow", str(folder), "--widths", "30-8-2", "--task", "digits", "--out", str(tmp_path / "bad")]) == 2
    assert "64-10-10" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_mnist_to_fashion_mnist_pair_runs_from_a_given_folder(tmp_path, capsys):
    """`transfer --mnist-dir DIR` adds the thesis's mnist → fashion_mnist pair from DIR's IDX files (synthetic
    here), guided on a fixed subset of the target's training points; a folder without them fails before any work."""
    from conftest import write_mnist

    from metaflow_ws.cli import main
    from metaflow_ws.experiments.transfer import TransferConfig, _pairs, _support

    data = tmp_path / "data"
    write_mnist(data / "MNIST" / "raw", n_train=600, n_test=50, seed=1)
    write_mnist(data / "FashionMNIST" / "raw", n_train=600, n_test=50, seed=2)
    cfg = TransferConfig.from_preset("tiny", mnist_root=str(data))
    pair = _pairs(cfg)[-1]
    assert (pair.key, pair.source.name, pair.target.name) == ("mnist", "mnist", "fashion_mnist")
    assert pair.source.spec.widths == (784, 10, 10) and pair.support_points == 256
    sup = _support(pair.target, torch.device("cpu"), pair.support_points, cfg.seed)
    x_train = pair.target.data(0).x_train
    assert sup.x.shape == (256, 784) and not torch.equal(sup.x, x_train[:256])  # a random subset ...
    assert all((x_train == row).all(1).any() for row in sup.x[:8])  # ... of the target's training points
    torch.testing.assert_close(_support(pair.target, torch.device("cpu"), 256, cfg.seed).x, sup.x)  # fixed

    out = tmp_path / "transfer"
    assert main(["transfer", "--out", str(out), "--preset", "tiny", "--json", "--device", "cpu",
                 "--mnist-dir", str(data)]) == 0
    res = json.loads((out / "results.json").read_text())
    tt = {t["key"]: t for t in res["task_transfer"]}
    assert set(tt) == {"digits", "mnist"} and tt["mnist"]["guidance_points"] == 256
    assert tt["mnist"]["target"] == "fashion_mnist" and res["sources"]["mnist"]["zoo_runs"] == 2
    assert len(tt["mnist"]["sweep"]) > 0 and all(0 <= r["accuracy_mean"] <= 1 for r in tt["mnist"]["sweep"])
    text = (out / "README.md").read_text()
    assert "### mnist → fashion_mnist (MLP 784-10-10 (relu)" in text and "256 training points" in text
    assert "guided transfer mnist → fashion_mnist" in text  # its goal row
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["transfer", "--out", str(tmp_path / "t2"), "--preset", "tiny", "--mnist-dir", str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "train-images-idx3-ubyte" in err and not (tmp_path / "t2").exists()
