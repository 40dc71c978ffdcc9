"""Flows: coordinates, training (loss, resume, divergence), save/load, samplers, guidance, CLI."""

import argparse
import dataclasses
import json
import math

import pytest
import torch

from metaflow_ws.flows import (
    FLOWS,
    FlowConfig,
    SampleConfig,
    TrainConfig,
    WeightCoordinates,
    WeightFlow,
    sample,
    train_flow,
)
from metaflow_ws.nets import NetworkSpec

from conftest import random_params

TINY = dict(d_model=16, num_layers=2, heads=1)


def tiny_config(zoo, flow):
    return FlowConfig(flow=flow, widths=zoo.spec.widths, activation=zoo.spec.activation, task=zoo.task,
                      prior_std=0.316, **TINY)


@pytest.fixture(scope="module")
def trained(tiny_bc_zoo):
    """One tiny trained flow per kind (30 steps)."""
    out = {}
    for flow in FLOWS:
        res = train_flow(tiny_bc_zoo, tiny_config(tiny_bc_zoo, flow),
                         TrainConfig(steps=30, batch_size=8, align=False, seed=0))
        out[flow] = res
    return out


@pytest.mark.parametrize("flow", FLOWS)
def test_coordinates_round_trip_preserves_function(small_spec, flow):
    coords = WeightCoordinates(small_spec, flow)
    p = random_params(small_spec, 4)
    x = coords.encode(p)
    assert x.shape == (4, coords.dim)
    q = coords.decode(x)
    inp = torch.randn(8, small_spec.in_features, dtype=torch.float64)
    assert torch.allclose(small_spec.batched_forward(p, inp), small_spec.batched_forward(q, inp), atol=1e-10)
    prior = coords.sample_prior(5, 0.3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert prior.shape == (5, coords.dim)
    assert torch.allclose(coords.data_manifold.project(prior), prior, atol=1e-10)


def test_scale_flows_reject_non_relu():
    with pytest.raises(ValueError, match="positively homogeneous"):
        WeightCoordinates(NetworkSpec((3, 4, 2), "tanh"), "geometric")
    WeightCoordinates(NetworkSpec((3, 4, 2), "tanh"), "euclidean")  # fine


@pytest.mark.parametrize("flow", FLOWS)
def test_training_runs_and_samples_are_real_networks(trained, tiny_bc_zoo, flow):
    res = trained[flow]
    assert len(res.losses) == 30 and all(math.isfinite(v) for v in res.losses)
    x = sample(res.flow, 6, SampleConfig(steps=8), generator=torch.Generator().manual_seed(0))
    assert x.shape == (6, res.flow.dim) and torch.isfinite(x).all()
    assert torch.allclose(res.flow.data_manifold.project(x), x, atol=1e-5)
    params = res.flow.decode(x)
    tiny_bc_zoo.spec.check(params)
    mods = tiny_bc_zoo.spec.to_modules(params)
    assert mods[0](torch.randn(3, 30)).shape == (3, 2)


@pytest.mark.parametrize("flow", FLOWS)
def test_save_load_round_trip(trained, tmp_path, flow):
    f = trained[flow].flow
    f.save_pretrained(tmp_path)
    g = WeightFlow.from_pretrained(tmp_path)
    x = f.sample_prior(3, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.3)
    assert torch.equal(f.predict_x1(x, t), g.predict_x1(x, t))
    with pytest.raises(ValueError, match="64-10-10"):
        g.check_spec(NetworkSpec((64, 10, 10)))


def test_narrow_edge_features_round_trip(tmp_path):
    """FlowConfig(d_edge=...) builds a field with narrower edge features, and save/load rebuilds the same one
    (a config.json written before d_edge existed loads with d_edge = d_model)."""
    cfg = FlowConfig(flow="geometric", widths=(5, 4, 3), d_model=16, d_edge=8, num_layers=2)
    f = WeightFlow(cfg)
    assert f.field.d_edge == 8
    assert sum(p.numel() for p in f.parameters()) < sum(
        p.numel() for p in WeightFlow(dataclasses.replace(cfg, d_edge=None)).parameters())
    f.save_pretrained(tmp_path)
    g = WeightFlow.from_pretrained(tmp_path)
    assert g.config.d_edge == 8
    x = f.sample_prior(3, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.3)
    assert torch.equal(f.predict_x1(x, t), g.predict_x1(x, t))
    old = json.loads((tmp_path / "config.json").read_text())
    old["config"].pop("d_edge")
    WeightFlow(dataclasses.replace(cfg, d_edge=None)).save_pretrained(tmp_path / "wide")
    (tmp_path / "wide" / "config.json").write_text(json.dumps(old))
    assert WeightFlow.from_pretrained(tmp_path / "wide").field.d_edge == 16


def test_corrupt_flow_folder(trained, tmp_path):
    trained["euclidean"].flow.save_pretrained(tmp_path)
    (tmp_path / "flow.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        WeightFlow.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a flow folder"):
        WeightFlow.from_pretrained(tmp_path / "nope")


def test_resume_gives_the_same_result(tiny_bc_zoo, tmp_path):
    cfg = tiny_config(tiny_bc_zoo, "geometric")
    tc = TrainConfig(steps=12, batch_size=8, align=False, seed=3, checkpoint_every=5, coupling="ot")
    straight = train_flow(tiny_bc_zoo, cfg, tc, tmp_path / "a")

    def interrupt(step, total, loss, sps):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_flow(tiny_bc_zoo, cfg, tc, tmp_path / "b", progress=interrupt)
    for other_cfg, other_tc, named in [(dataclasses.replace(cfg, d_model=cfg.d_model * 2), tc, "d_model="),
                                       (cfg, dataclasses.replace(tc, lr=tc.lr / 2), "lr=0.01 \\(now 0.005\\)")]:
        with pytest.raises(ValueError, match=f"cannot resume from .*written with {named}.*pass the original"):
            train_flow(tiny_bc_zoo, other_cfg, other_tc, tmp_path / "b", resume=True)  # another run: refused
    resumed = train_flow(tiny_bc_zoo, cfg, tc, tmp_path / "b", resume=True)
    assert resumed.resumed_from == 5
    assert resumed.losses == straight.losses
    for k, v in straight.flow.state_dict().items():
        assert torch.equal(v, resumed.flow.state_dict()[k]), k


def test_divergence_is_a_clear_error(tiny_bc_zoo):
    with pytest.raises(FloatingPointError, match="diverged"):
        train_flow(tiny_bc_zoo, tiny_config(tiny_bc_zoo, "euclidean"),
                   TrainConfig(steps=50, batch_size=8, align=False, lr=1e12, grad_clip=1e30, warmup=1))


class _ConstantAccelerationFlow:
    """A stand-in flow with velocity v(x, t) = 3t² (x(t) = x0 + t³) on a Euclidean path."""

    def __init__(self):
        from metaflow_ws.flows.coordinates import WeightCoordinates

        self.coords = WeightCoordinates(NetworkSpec((1, 1)), "euclidean")
        self.path_manifold = self.data_manifold = self.coords.path_manifold

    def eval(self):
        return self

    def sample_prior(self, n, generator=None):
        return torch.zeros(n, 2, dtype=torch.float64)

    def velocity(self, x, t, cond=None):
        return (3 * t**2).unsqueeze(-1).expand_as(x)


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_solvers_on_a_known_ode(solver, order):
    errs = []
    for steps in (16, 32):
        x = sample(_ConstantAccelerationFlow(), 2, SampleConfig(steps=steps, solver=solver))
        errs.append(float((x - 1.0).abs().max()))
    assert errs[1] < errs[0]
    # error ratio ≈ 2^order (Heun's last step is Euler, so allow slack)
    assert errs[0] / errs[1] > (1.8 if order == 1 else 1.9)
    if solver == "heun":
        assert errs[1] < 0.01


def test_time_grid_closed_form_and_errors():
    from metaflow_ws.flows import time_grid

    assert torch.equal(time_grid(8), torch.linspace(0, 1, 9, dtype=torch.float64))  # rho = 1: exactly uniform
    ts = time_grid(4, 2.0)
    assert torch.allclose(ts, torch.tensor([0.0, 1 - 0.75**2, 1 - 0.5**2, 1 - 0.25**2, 1.0], dtype=torch.float64))
    for rho in (0.5, 1.0, 3.0):
        g = time_grid(16, rho)
        assert g[0] == 0 and g[-1] == 1 and (g.diff() > 0).all()
    assert (time_grid(16, 3.0).diff().diff() < 0).all()  # steps shrink toward t = 1
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho"):
            time_grid(4, bad)
        with pytest.raises(ValueError, match="rho"):
            SampleConfig(rho=bad)


@pytest.mark.parametrize("rho", [1.0, 2.0, 3.0])
def test_euler_follows_the_time_grid(rho):
    """Euler on v = 3t² from 0 is the left Riemann sum of 3t² over the grid: Σ 3 t_i² (t_{i+1} − t_i)."""
    from metaflow_ws.flows import time_grid

    ts = time_grid(8, rho)
    expect = float((3 * ts[:-1] ** 2 * ts.diff()).sum())
    x = sample(_ConstantAccelerationFlow(), 2, SampleConfig(steps=8, rho=rho))
    assert torch.allclose(x, torch.full_like(x, expect), atol=1e-12)


def _mean_task_loss(flow, x, xb, yb):
    from metaflow_ws.train.losses import prediction_loss

    out = flow.spec.batched_forward(flow.decode(x), xb)
    return float(torch.stack([prediction_loss(o, yb, "classification") for o in out]).mean())


@pytest.mark.parametrize("flow", FLOWS)
def test_guidance_gradient_is_a_descent_direction(trained, flow):
    from metaflow_ws.flows import guidance_gradient
    from metaflow_ws.tasks import get_task

    f = trained[flow].flow
    d = get_task("breast_cancer").data(0)
    xb, yb = d.x_train[:128], d.y_train[:128]
    x = sample(f, 6, SampleConfig(steps=6), generator=torch.Generator().manual_seed(0))
    g = guidance_gradient(f, x, xb, yb, "classification")
    assert g.shape == x.shape and torch.isfinite(g).all()
    man = f.path_manifold
    step = man.exp(x, -1e-2 * man.proj_tangent(x, g) / g.norm(dim=1, keepdim=True))
    assert _mean_task_loss(f, step, xb, yb) < _mean_task_loss(f, x, xb, yb)
    # per-sample gradients: sample 0's gradient does not depend on the other samples
    g0 = guidance_gradient(f, x[:1], xb, yb, "classification")
    torch.testing.assert_close(g0[0], g[0], rtol=1e-4, atol=1e-6)


def test_guided_sampling_lowers_the_task_loss(trained):
    from metaflow_ws.tasks import get_task

    flow = trained["euclidean"].flow
    d = get_task("breast_cancer").data(0)
    xb, yb = d.x_train[:128], d.y_train[:128]
    plain = sample(flow, 8, SampleConfig(steps=10), generator=torch.Generator().manual_seed(0))
    guided = sample(flow, 8, SampleConfig(steps=10, guidance=10.0), generator=torch.Generator().manual_seed(0),
                    guidance_data=(xb, yb, "classification"))
    assert _mean_task_loss(flow, guided, xb, yb) < _mean_task_loss(flow, plain, xb, yb)
    with pytest.raises(ValueError, match="guidance needs task data"):
        sample(flow, 2, SampleConfig(steps=2, guidance=1.0))


def test_stochastic_sampling_changes_samples(trained):
    flow = trained["euclidean"].flow
    a = sample(flow, 4, SampleConfig(steps=10), generator=torch.Generator().manual_seed(0))
    b = sample(flow, 4, SampleConfig(steps=10, noise=0.5), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


def test_cli_train_sample_evaluate(tiny_bc_zoo, tmp_path, capsys):
    from metaflow_ws.cli import main

    zoo = tmp_path / "zoo.safetensors"
    tiny_bc_zoo.save(zoo)
    assert main(["train", "--zoo", str(zoo), "--flow", "geometric", "--steps", "6", "--batch-size", "4",
                 "--d-model", "16", "--layers", "1", "--out", str(tmp_path / "flow"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["steps"] == 6 and res["flow"] == "geometric"
    assert main(["sample", "--flow", str(tmp_path / "flow"), "-n", "5", "--steps", "4", "--solver", "heun",
                 "--rho", "3", "--out", str(tmp_path / "s.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rho"] == 3
    assert main(["evaluate", "--task", "breast_cancer", "--weights", str(tmp_path / "s.safetensors"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["n"] == 5 and 0 <= ev["accuracy_mean"] <= 1
    assert main(["sample", "--flow", str(tmp_path / "flow"), "-n", "2", "--steps", "2", "--guidance", "0.5",
                 "--guidance-normalize", "--guidance-at", "x1", "--task", "breast_cancer", "--precision", "bf16",
                 "--out", str(tmp_path / "g.safetensors")]) == 0
    from metaflow_ws.io import Zoo

    info = Zoo.load(tmp_path / "g.safetensors").info
    assert info["sampler"]["guidance"] == 0.5 and info["sampler"]["guidance_normalize"] is True
    assert info["sampler"]["guidance_at"] == "x1"
    assert info["precision"] == "bf16" and info["compiled"] is False
    assert info["sampler"]["rho"] == SampleConfig.rho == 2.0  # the default grid
    assert main(["sample", "--flow", str(tmp_path / "flow"), "-n", "2", "--rho", "0",
                 "--out", str(tmp_path / "r.safetensors")]) == 2
    assert "rho" in capsys.readouterr().err and not (tmp_path / "r.safetensors").exists()
    # a flow used on a task of another architecture is a clear error
    assert main(["sample", "--flow", str(tmp_path / "flow"), "-n", "2", "--guidance", "0.1", "--task", "digits",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "64-10-10" in capsys.readouterr().err
    assert main(["train", "--zoo", str(tmp_path / "missing.safetensors"), "--flow", "euclidean",
                 "--out", str(tmp_path / "f2")]) == 2


def test_cli_compare_writes_table(tiny_bc_zoo, tmp_path, capsys):
    from metaflow_ws.cli import main

    zoo = tmp_path / "zoo.safetensors"
    tiny_bc_zoo.save(zoo)
    assert main(["compare", "--zoo", str(zoo), "--out", str(tmp_path / "res"), "--flows", "euclidean", "geometric:ot",
                 "--steps", "3", "--d-model", "8", "--layers", "1", "-n", "4", "--sample-steps", "3", "--precision",
                 "bf16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["method"] for r in res["rows"]][1:] == ["Euclidean (aligned)", "Geometric (aligned+OT)"]
    text = (tmp_path / "res" / "README.md").read_text()
    assert "| Geometric (aligned+OT) |" in text and "metaflow-ws compare" in text
    assert (tmp_path / "res" / "flows" / "geometric_ot_aligned" / "samples.safetensors").is_file()
    saved = json.loads((tmp_path / "res" / "flows" / "geometric_ot_aligned" / "config.json").read_text())
    assert saved["train"]["precision"] == "bf16"
    assert main(["compare", "--zoo", str(zoo), "--out", str(tmp_path / "r2"), "--flows", "spherical"]) == 2


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from metaflow_ws.demo import main

    assert main(["--out", str(tmp_path), "--runs", "20", "--steps", "200"]) == 0
    assert (tmp_path / "compare" / "README.md").is_file()


@pytest.mark.parametrize("kind", ["euclidean", "geometric"])
def test_perm_coupling_keeps_functions_and_shortens_paths(tiny_bc_zoo, kind):
    """perm: each data network becomes the neuron ordering closest to its prior draw — same function, nearer x0."""
    from metaflow_ws.flows.couplings import make_coupling

    flow = WeightFlow(tiny_config(tiny_bc_zoo, kind))
    x1 = flow.encode({k: v[:8].float() for k, v in tiny_bc_zoo.params.items()})
    x0 = flow.sample_prior(8, generator=torch.Generator().manual_seed(0))
    for name in ("perm", "ot-perm"):
        c0, c1 = make_coupling(name, flow.path_manifold if kind == "geometric" else None, flow.coords)(x0, x1)
        assert sorted(c0.tolist()) == sorted(x0.tolist())  # the prior batch is only reordered
        xs = torch.randn(16, tiny_bc_zoo.spec.in_features)
        spec = tiny_bc_zoo.spec
        f_before = spec.batched_forward(flow.decode(x1), xs)
        f_after = spec.batched_forward(flow.decode(c1), xs)
        if name == "perm":
            assert torch.equal(c0, x0)
            assert torch.allclose(f_before, f_after, atol=1e-4)  # same networks, neurons reordered
            d = flow.path_manifold.dist if kind == "geometric" else (lambda a, b: (a - b).norm(dim=1))
            assert (d(c0, c1) <= d(x0, x1) + 1e-4).all() and (d(c0, c1) < d(x0, x1) - 1e-3).any()
    with pytest.raises(ValueError, match="coordinates"):
        make_coupling("perm")


@pytest.mark.parametrize("kind", ["euclidean", "geometric"])
def test_preconditioning_closed_form_and_limits(tiny_bc_zoo, kind):
    import dataclasses

    cfg = dataclasses.replace(tiny_config(tiny_bc_zoo, kind), precondition=True)
    flow = WeightFlow(cfg).double()
    x1 = flow.encode({k: v.double() for k, v in tiny_bc_zoo.params.items()})
    flow.set_scale_from(x1)
    # prior RMS in scaled units, per block: what sample_prior draws, divided by the data's per-block RMS
    x0 = flow.sample_prior(4096, generator=torch.Generator().manual_seed(5)) / flow.scale
    start, stop = tiny_bc_zoo.spec.offsets["layers.1.weight"]
    assert flow.prior_rms[start:stop].unique().numel() == 1
    assert float(flow.prior_rms[start]) == pytest.approx(float(x0[:, start:stop].pow(2).mean().sqrt()), rel=0.02)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    c_skip, c_out = flow.preconditioning(t)
    s0 = flow.prior_rms
    var = ((1 - t[1]) * s0) ** 2 + t[1] ** 2
    torch.testing.assert_close(c_skip[1], t[1] / var)
    torch.testing.assert_close(c_out[1], (1 - t[1]) * s0 / var.sqrt())
    assert torch.all(c_skip[0] == 0) and torch.allclose(c_out[0], torch.ones_like(s0))  # t = 0: x̂1 = F (data RMS 1)
    assert torch.all(c_skip[2] == 1) and torch.all(c_out[2] == 0)  # t = 1: x̂1 = x_t exactly
    xt = x1[:3]
    torch.testing.assert_close(flow.predict_x1(xt, torch.ones(3, dtype=torch.float64)), xt)
    # the plain parameterization is (c_skip, c_out) = (0, 1)
    plain = WeightFlow(tiny_config(tiny_bc_zoo, kind))
    c_skip, c_out = plain.preconditioning(t.float())
    assert torch.all(c_skip == 0) and torch.all(c_out == 1) and not hasattr(plain, "prior_rms")


def test_anchored_preconditioned_flow_trains_saves_and_loads(tiny_bc_zoo, tmp_path):
    import dataclasses

    cfg = dataclasses.replace(tiny_config(tiny_bc_zoo, "euclidean"), precondition=True, anchor=True)
    res = train_flow(tiny_bc_zoo, cfg, TrainConfig(steps=6, batch_size=8, align=True, coupling="ot", seed=0),
                     tmp_path / "f")
    f = res.flow
    # the default anchor is the alignment reference, network 0 of the (aligned) zoo, which alignment leaves as is
    torch.testing.assert_close(f.anchor, f.encode({k: v[:1] for k, v in tiny_bc_zoo.params.items()})[0])
    g = WeightFlow.from_pretrained(tmp_path / "f")
    assert g.config.anchor and g.config.precondition
    x = f.sample_prior(3, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.3)
    assert torch.equal(f.predict_x1(x, t), g.predict_x1(x, t))
    # another anchor, another field
    g.set_anchor({k: v[5] for k, v in tiny_bc_zoo.params.items()})
    assert not torch.equal(f.predict_x1(x, t), g.predict_x1(x, t))
    with pytest.raises(ValueError, match="tied to its anchor"):
        g.for_spec(NetworkSpec((30, 8, 16, 2)))


def test_anchor_errors(tiny_bc_zoo):
    import dataclasses

    anchored = dataclasses.replace(tiny_config(tiny_bc_zoo, "euclidean"), anchor=True)
    net = {k: v[3] for k, v in tiny_bc_zoo.params.items()}
    with pytest.raises(ValueError, match="out of the anchor's permutation basin"):
        train_flow(tiny_bc_zoo, anchored, TrainConfig(steps=1, coupling="ot-perm"))
    with pytest.raises(ValueError, match=r"align=False\) with an explicit anchor"):
        train_flow(tiny_bc_zoo, anchored, TrainConfig(steps=1, coupling="ot", align=True), anchor=net)
    with pytest.raises(ValueError, match="needs an anchored flow"):
        train_flow(tiny_bc_zoo, tiny_config(tiny_bc_zoo, "euclidean"), TrainConfig(steps=1), anchor=net)
    with pytest.raises(ValueError, match="has no anchor"):
        WeightFlow(tiny_config(tiny_bc_zoo, "euclidean")).set_anchor(net)
    with pytest.raises(ValueError, match="one network of"):
        WeightFlow(anchored).set_anchor(torch.zeros(7))
    res = train_flow(tiny_bc_zoo, anchored, TrainConfig(steps=2, batch_size=4, coupling="independent", align=False),
                     anchor=net)
    torch.testing.assert_close(res.flow.anchor, res.flow.encode({k: v[None] for k, v in net.items()})[0])


def test_default_prior_std(tiny_bc_zoo):
    """The prior's σ: a synthetic task's [synthetic] prior_std, else the zoo's init scale (recipe init_std)."""
    import dataclasses

    from metaflow_ws.flows import default_prior_std
    from metaflow_ws.tasks import get_task

    assert default_prior_std(tiny_bc_zoo) == get_task("breast_cancer").recipe.init_std
    other = dataclasses.replace(tiny_bc_zoo, recipe={**tiny_bc_zoo.recipe, "init_std": 0.7})
    assert default_prior_std(other) == 0.7
    assert default_prior_std(dataclasses.replace(other, task="not_registered[64-32-10]")) == 0.7
    toy = get_task("gaussian_toy")
    toy_zoo = dataclasses.replace(tiny_bc_zoo, task="gaussian_toy", recipe={"init_std": 123.0})
    assert default_prior_std(toy_zoo) == toy.synthetic.prior_std != 123.0


def _has_cxx() -> bool:
    import os
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)


@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_matches_eager_and_restores_the_field(tiny_bc_zoo):
    cfg = FlowConfig(flow="geometric", widths=tiny_bc_zoo.spec.widths, task=tiny_bc_zoo.task, d_model=8,
                     num_layers=1)
    tc = TrainConfig(steps=4, batch_size=8, align=False, seed=1, coupling="independent")
    eager = train_flow(tiny_bc_zoo, cfg, tc)
    compiled = train_flow(tiny_bc_zoo, cfg, dataclasses.replace(tc, compile=True))
    # the same function, fused: losses and weights agree to float rounding
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    for k, v in eager.flow.state_dict().items():
        torch.testing.assert_close(compiled.flow.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    # outside the block the eager field (with its checkpointing rule) is back; keys are the field's own
    flow = compiled.flow
    assert "_compiled_field" not in flow.__dict__ and flow.field.checkpoint == "auto"
    assert set(flow.state_dict()) == set(eager.flow.state_dict())
    with flow.compiled():
        assert "_compiled_field" in flow.__dict__ and flow.field.checkpoint is False
    with flow.compiled(enabled=False):
        assert "_compiled_field" not in flow.__dict__ and flow.field.checkpoint == "auto"


def test_compile_failure_is_a_clear_error(tiny_bc_zoo, monkeypatch):
    import torch._dynamo

    flow = WeightFlow(FlowConfig(flow="euclidean", widths=tiny_bc_zoo.spec.widths, d_model=8, num_layers=1))

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.BackendCompilerFailed("inductor", RuntimeError("InvalidCxxCompiler: no compiler"), None)

    monkeypatch.setattr(torch, "compile", lambda module, **kw: broken)
    x = torch.zeros(2, flow.dim)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*compile=False"):
        with flow.compiled():
            flow.predict_x1(x, torch.zeros(2))
    assert "_compiled_field" not in flow.__dict__ and flow.field.checkpoint == "auto"


@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_cli_train_compile(tiny_bc_zoo, tmp_path, capsys):
    from metaflow_ws.cli import main

    zoo = tmp_path / "zoo.safetensors"
    tiny_bc_zoo.save(zoo)
    assert main(["train", "--zoo", str(zoo), "--flow", "geometric", "--steps", "2", "--batch-size", "8",
                 "--d-model", "8", "--layers", "1", "--no-align", "--coupling", "independent", "--compile",
                 "--out", str(tmp_path / "flow"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["compiled"] is True and res["steps"] == 2
    saved = json.loads((tmp_path / "flow" / "config.json").read_text())
    assert saved["train"]["compile"] is True
    WeightFlow.from_pretrained(tmp_path / "flow")  # the saved flow is the eager field's state
    # compiled sampling draws the same networks as eager sampling
    from metaflow_ws.io import Zoo

    for flag in ([], ["--compile"]):
        assert main(["sample", "--flow", str(tmp_path / "flow"), "-n", "4", "--steps", "3", *flag,
                     "--out", str(tmp_path / f"s{len(flag)}.safetensors")]) == 0
    eager, compiled = (Zoo.load(tmp_path / f"s{i}.safetensors") for i in (0, 1))
    assert compiled.info["compiled"] is True
    for k, v in eager.params.items():
        torch.testing.assert_close(compiled.params[k], v, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_field_close_to_fp32_and_training_stays_fp32(tiny_bc_zoo):
    cfg = FlowConfig(flow="geometric", widths=tiny_bc_zoo.spec.widths, task=tiny_bc_zoo.task, d_model=16,
                     num_layers=2)
    torch.manual_seed(0)
    flow = WeightFlow(cfg)
    x = flow.data_manifold.project(torch.randn(4, flow.dim))
    t = torch.rand(4)
    with torch.no_grad():
        ref = flow.predict_x1(x, t)
        with flow.autocast("bf16"):
            amp = flow.predict_x1(x, t)
    assert "_autocast_dtype" not in flow.__dict__
    # the field really ran in bfloat16 (8-bit mantissa: not bit-identical) and its output came back as float32,
    # within bfloat16 rounding of the float32 result
    assert amp.dtype == torch.float32 and not torch.equal(amp, ref)
    assert float((amp - ref).norm() / ref.norm()) < 3e-2
    with flow.autocast(None), torch.no_grad():
        torch.testing.assert_close(flow.predict_x1(x, t), ref)
    tc = TrainConfig(steps=4, batch_size=8, align=False, seed=1, coupling="independent")
    fp32 = train_flow(tiny_bc_zoo, cfg, tc)
    bf16 = train_flow(tiny_bc_zoo, cfg, dataclasses.replace(tc, precision="bf16"))
    assert bf16.losses == pytest.approx(fp32.losses, rel=5e-2) and bf16.losses != fp32.losses
    assert all(v.dtype == torch.float32 for v in bf16.flow.state_dict().values() if v.is_floating_point())


@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_bf16_field_gradients_are_finite_and_match_eager_bf16():
    """`train --compile --precision bf16`: torch 2.13's Inductor fused the bfloat16 block attention with the
    layers around it into a backward with non-finite gradients for the node projections (training stopped at
    step 2 with loss NaN, at the d_model 64 field of the benchmarks). The field now compiles the attention apart."""
    from metaflow_ws.models import RelationalTransformer

    torch.manual_seed(0)
    spec = NetworkSpec((30, 16, 16, 2), "relu")
    field = RelationalTransformer(spec, d_model=64, num_layers=1, d_edge=32)
    x, t, y = torch.randn(8, spec.num_params), torch.rand(8), torch.randn(8, spec.num_params)

    def grads(f):
        field.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = f(x, t, None)
        ((out.float() - y) ** 2).mean().backward()
        return {n: p.grad.clone() for n, p in field.named_parameters() if p.grad is not None}

    eager, compiled = grads(field), grads(torch.compile(field, dynamic=False))
    assert set(compiled) == set(eager)
    for name, g in eager.items():
        assert torch.isfinite(compiled[name]).all(), name
        # bfloat16 rounding differs between the fused and the eager kernels; a wrong gradient differs by O(1)
        assert float((compiled[name] - g).norm() / g.norm().clamp_min(1e-12)) < 0.15, name


def test_learning_rate_default_is_shared_and_bad_rates_are_clear_errors(capsys):
    from metaflow_ws.cli import build_parser, main
    from metaflow_ws.experiments.report import ReportConfig
    from metaflow_ws.tasks import get_task

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "compare", "report"):
        lr = next(a for a in sub.choices[command]._actions if a.dest == "lr")
        assert lr.default is None, command  # unset: the task's [flow] lr, else TrainConfig.lr, everywhere
    assert TrainConfig.lr == 1e-2
    assert ReportConfig(task="breast_cancer", out_dir="unused").lr == TrainConfig.lr
    assert ReportConfig(task="digits", out_dir="unused").lr == get_task("digits").flow.lr == 5e-3
    for bad in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="lr must be a finite number > 0"):
            TrainConfig(lr=bad)
    for command in (["train", "--zoo", "missing.safetensors", "--flow", "geometric"], ["report", "--task", "digits"]):
        with pytest.raises(SystemExit) as e:  # a usage error, before any file is read or anything trained
            main([*command, "--lr", "0", "--out", "x"])
        assert e.value.code == 2
        assert "argument --lr: lr must be a finite number > 0; got 0.0" in capsys.readouterr().err


def test_unknown_precision_is_a_clear_error():
    import argparse

    from metaflow_ws.commands import add_speed_options
    from metaflow_ws.flows import PRECISIONS

    p = argparse.ArgumentParser()
    add_speed_options(p)
    assert next(a for a in p._actions if a.dest == "precision").choices == list(PRECISIONS)  # CLI ↔ library
    with pytest.raises(ValueError, match="unknown precision 'fp16'.*'bf16'"):
        TrainConfig(precision="fp16")
    flow = WeightFlow(FlowConfig(flow="euclidean", widths=(3, 4, 2), d_model=8, num_layers=1))
    with pytest.raises(ValueError, match="unsupported autocast dtype"):
        with flow.autocast(torch.float16):
            pass


def test_cli_train_precision(tiny_bc_zoo, tmp_path, capsys):
    from metaflow_ws.cli import main

    zoo = tmp_path / "zoo.safetensors"
    tiny_bc_zoo.save(zoo)
    assert main(["train", "--zoo", str(zoo), "--flow", "normalized", "--steps", "2", "--batch-size", "8",
                 "--d-model", "8", "--d-edge", "4", "--layers", "1", "--no-align", "--coupling", "independent",
                 "--precision", "bf16",
                 "--out", str(tmp_path / "flow"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["precision"] == "bf16"
    saved = json.loads((tmp_path / "flow" / "config.json").read_text())
    assert saved["train"]["precision"] == "bf16" and saved["config"]["d_edge"] == 4
    with pytest.raises(SystemExit):
        main(["train", "--zoo", str(zoo), "--flow", "normalized", "--precision", "fp8", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("kind", FLOWS)
def test_path_noise_moves_x_t_by_sigma_block_rms_on_the_path_manifold(tiny_bc_zoo, kind, monkeypatch):
    from metaflow_ws.flows.train import flow_matching_loss

    sigma = 0.2
    flow = WeightFlow(dataclasses.replace(tiny_config(tiny_bc_zoo, kind), sigma=sigma)).double()
    x1 = flow.encode({k: v.double() for k, v in tiny_bc_zoo.params.items()})
    flow.set_scale_from(x1)
    x1 = x1[torch.arange(512) % len(x1)]
    x0 = flow.sample_prior(512, generator=torch.Generator().manual_seed(1)).double()
    t = torch.rand(512, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.9
    seen = []
    monkeypatch.setattr(flow, "predict_x1", lambda x, tt, cond=None: seen.append(x) or x)
    flow_matching_loss(flow, x0, x1, t, sigma=0.0)
    flow_matching_loss(flow, x0, x1, t, sigma=sigma, generator=torch.Generator().manual_seed(3))
    clean, noisy = seen
    man = flow.path_manifold
    torch.testing.assert_close(clean, man.interpolate(x0, x1, t))  # sigma = 0: the plain path point
    torch.testing.assert_close(man.project(noisy), noisy)  # still on the path manifold
    step = (noisy - clean) / flow.scale
    if kind != "geometric":  # flat path: exactly σ · scale · ε, so the scaled step has std σ
        assert float(step.std()) == pytest.approx(sigma, rel=0.03)
        assert abs(float(step.mean())) < 0.01
    else:  # spheres: projecting back shortens the step a little
        assert 0.5 * sigma < float(step.std()) < 1.05 * sigma


def test_path_noise_errors_and_cli(tiny_bc_zoo, tmp_path, capsys):
    from metaflow_ws.cli import main
    from metaflow_ws.flows.flow import SIGMA

    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="path noise"):
            dataclasses.replace(tiny_config(tiny_bc_zoo, "geometric"), sigma=bad)
    zoo = tmp_path / "zoo.safetensors"
    tiny_bc_zoo.save(zoo)
    common = ["train", "--zoo", str(zoo), "--flow", "euclidean", "--steps", "2", "--batch-size", "4",
              "--d-model", "8", "--layers", "1", "--json"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["path_noise"] == SIGMA
    assert WeightFlow.from_pretrained(tmp_path / "a").config.sigma == SIGMA
    assert main([*common, "--path-noise", "0", "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert WeightFlow.from_pretrained(tmp_path / "b").config.sigma == 0.0
    assert main([*common, "--path-noise", "-1", "--out", str(tmp_path / "c")]) == 2
    assert "path noise" in capsys.readouterr().err
