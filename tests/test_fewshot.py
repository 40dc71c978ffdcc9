"""Few-shot episodes, the protocol, and the torch.func MAML-family baselines."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from metaflow_ws.cli import main
from metaflow_ws.fewshot.baselines import (
    METHODS,
    GradientMetaLearner,
    MetaConfig,
    get_method,
    method_names,
    register_method,
)
from metaflow_ws.fewshot.episodes import (
    STREAMS,
    DigitsFewShot,
    Episodes,
    SinusoidFamily,
    get_family,
    stream_generator,
    stream_seed,
)
from metaflow_ws.fewshot.protocol import (
    Method,
    best_of,
    load_method_state,
    run_protocol,
    save_method_state,
    sgd_adapt,
)
from metaflow_ws.nets.spec import NetworkSpec

SMALL = SinusoidFamily(spec=NetworkSpec((1, 8, 8, 1)))


@pytest.fixture(scope="module")
def digits() -> DigitsFewShot:
    return DigitsFewShot(hidden=(8,))


def _to64(ep: Episodes) -> Episodes:
    return Episodes(*(t.double() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.task_params)),
                    ep.kind)


def _method64(name: str, family=SMALL, **cfg) -> GradientMetaLearner:
    m = get_method(name, family, MetaConfig(iterations=1, **cfg), seed=1)
    m.params = {k: v.double() for k, v in m.params.items()}
    return m


# ------------------------------------------------------------------------------------------------ episodes
def test_sinusoid_shapes_ranges_and_reproducibility():
    ep = SMALL.sample(7, 5, 11, torch.Generator().manual_seed(3))
    assert ep.support_x.shape == (7, 5, 1) and ep.support_y.shape == (7, 5, 1)
    assert ep.query_x.shape == (7, 11, 1) and ep.task_params.shape == (7, 2)
    amp, phase = ep.task_params.T
    assert (amp >= 0.1).all() and (amp <= 5).all() and (phase >= 0).all() and (phase <= math.pi).all()
    assert ep.support_x.abs().max() <= 5
    expect = amp[:, None, None] * torch.sin(ep.support_x - phase[:, None, None])
    torch.testing.assert_close(ep.support_y, expect, atol=1e-5, rtol=1e-5)
    again = SMALL.sample(7, 5, 11, torch.Generator().manual_seed(3))
    assert torch.equal(ep.support_x, again.support_x) and torch.equal(ep.query_y, again.query_y)
    other = SMALL.sample(7, 5, 11, torch.Generator().manual_seed(4))
    assert not torch.equal(ep.task_params, other.task_params)


def test_sinusoid_family_matches_task_file():
    fam = get_family("sinusoid")
    assert fam.spec.widths == (1, 40, 40, 1) and fam.amplitude_range == (0.1, 5.0) and fam.x_range == (-5.0, 5.0)


def test_test_set_nested_supports_shared_queries():
    sets = SMALL.test_set((5, 10, 20), n_tasks=9, n_query=100, seed=0)
    assert sets[5].query_x.shape == (9, 100, 1) and sets[20].support_x.shape == (9, 20, 1)
    assert torch.equal(sets[5].support_x, sets[20].support_x[:, :5])
    assert torch.equal(sets[5].query_x, sets[10].query_x) and torch.equal(sets[5].task_params, sets[20].task_params)
    assert torch.equal(SMALL.test_set((5,), n_tasks=9, seed=0)[5].support_x, sets[5].support_x)


def test_meta_train_and_meta_test_streams_are_disjoint():
    seeds = {s: {stream_seed(i, s) for i in range(2000)} for s in STREAMS}
    for a in STREAMS:
        for b in STREAMS:
            if a != b:
                assert not seeds[a] & seeds[b]
    test = SMALL.test_set((5,), n_tasks=50, seed=0)[5].task_params
    for seed in range(3):  # the training draws of any training seed never reproduce the test tasks
        train = SMALL.sample(50, 5, 5, stream_generator(seed, "train")).task_params
        assert torch.cdist(test, train).min() > 0
    with pytest.raises(ValueError, match="unknown seed stream"):
        stream_seed(0, "validation")


def test_digits_episodes(digits):
    sets = digits.test_set((1, 5), n_tasks=12, seed=0)
    ep = sets[5]
    assert ep.support_x.shape == (12, 25, 64) and ep.support_y.shape == (12, 25, 5)
    assert ep.query_x.shape == (12, 75, 64) and ep.task_params.shape == (12, 5)
    assert torch.equal(ep.support_y.sum(1), torch.full((12, 5), 5.0))  # 5 examples of each label
    assert set(ep.task_params.unique().tolist()) <= {5.0, 6.0, 7.0, 8.0, 9.0}
    assert len({tuple(r) for r in ep.task_params.tolist()}) > 1  # labels permuted across episodes
    assert torch.equal(sets[1].support_x, ep.support_x.reshape(12, 5, 5, 64)[:, :, :1].reshape(12, 5, 64))
    assert torch.equal(sets[1].query_x, ep.query_x)
    alone = digits.test_set((1,), n_tasks=12, seed=0)[1]
    assert torch.equal(alone.support_x, sets[1].support_x) and torch.equal(alone.query_x, ep.query_x)
    # the support examples' pixels come from the labelled digit; support and query never share an example
    # (sklearn's 1,797 digit images are all distinct, so equal rows mean the same example)
    x_pool, y_pool = digits._pool
    for t in range(3):
        for row in range(25):
            hit = (x_pool == ep.support_x[t, row]).all(1)
            assert int(hit.sum()) == 1
            assert int(y_pool[hit]) == int(ep.task_params[t, int(ep.support_y[t, row].argmax())])
        rows = torch.cat([ep.support_x[t], ep.query_x[t]])
        assert len(torch.unique(rows, dim=0)) == 100
    train = digits.sample(4, 2, 3, torch.Generator().manual_seed(0))
    assert set(train.task_params.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    again = digits.sample(4, 2, 3, torch.Generator().manual_seed(0))
    assert torch.equal(train.support_x, again.support_x)


def test_bad_inputs_are_rejected(digits):
    with pytest.raises(ValueError, match="unknown few-shot family 'nope'"):
        get_family("nope")
    with pytest.raises(ValueError, match="disjoint"):
        DigitsFewShot(train_classes=(0, 1, 2, 3, 4), test_classes=(4, 5, 6, 7, 8))
    with pytest.raises(ValueError, match="need 300 examples"):
        digits.test_set((200,), n_tasks=1, n_query=100)
    with pytest.raises(ValueError, match="support sizes"):
        SMALL.test_set((0,), n_tasks=3)
    with pytest.raises(ValueError, match=r"\(T, n, features\)"):
        Episodes(torch.zeros(2, 3), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1), torch.zeros(2, 3, 1),
                 torch.zeros(2, 2), "regression")
    with pytest.raises(ValueError, match="unknown few-shot method 'nope'"):
        get_method("nope", SMALL)


# ------------------------------------------------------------------------------------------------ adaptation
@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_vmapped_adaptation_equals_torch_optim_sgd(kind, digits):
    fam = SMALL if kind == "regression" else digits
    ep = _to64(fam.sample(4, 3, 2, torch.Generator().manual_seed(0)))
    spec = fam.spec
    params = spec.init(4, scheme="kaiming_uniform", generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    adapted = sgd_adapt(spec, kind, params, ep.support_x, ep.support_y, steps=5, lr=0.1)
    for t in range(4):
        net = spec.module().double()
        spec.load_into(net, {k: v[t] for k, v in params.items()})
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            out = net(ep.support_x[t])
            if kind == "regression":
                loss = torch.nn.functional.mse_loss(out, ep.support_y[t])
            else:
                loss = torch.nn.functional.cross_entropy(out, ep.support_y[t].argmax(-1))
            loss.backward()
            opt.step()
        ref = spec.params_of_module(net)
        for k in ref:
            torch.testing.assert_close(adapted[k][t], ref[k], atol=1e-12, rtol=1e-10)


def _reference_meta_grad(spec, theta, ep, lr, first_order):
    """Hand-written MAML on ONE task with autograd (double backward unless first order)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
    ls = torch.mean((spec.forward(leaves, ep.support_x[0]) - ep.support_y[0]) ** 2)
    g = torch.autograd.grad(ls, list(leaves.values()), create_graph=not first_order)
    phi = {k: v - lr * gi for (k, v), gi in zip(leaves.items(), g)}
    lq = torch.mean((spec.forward(phi, ep.query_x[0]) - ep.query_y[0]) ** 2)
    return dict(zip(leaves, torch.autograd.grad(lq, list(leaves.values()))))


def test_maml_second_order_meta_gradient_matches_double_backward():
    ep = _to64(SMALL.sample(1, 5, 7, torch.Generator().manual_seed(2)))
    maml, fomaml = _method64("maml", inner_lr=0.3), _method64("fomaml", inner_lr=0.3)
    theta = GradientMetaLearner.theta(maml.params)
    ref2 = _reference_meta_grad(SMALL.spec, theta, ep, 0.3, first_order=False)
    ref1 = _reference_meta_grad(SMALL.spec, theta, ep, 0.3, first_order=True)
    g2, _ = maml.meta_gradient(maml.params, ep)
    g1, _ = fomaml.meta_gradient(fomaml.params, ep)
    for k in ref2:
        torch.testing.assert_close(g2[f"theta.{k}"], ref2[k], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(g1[f"theta.{k}"], ref1[k], atol=1e-12, rtol=1e-10)
    diff = max(float((g2[f"theta.{k}"] - g1[f"theta.{k}"]).abs().max()) for k in ref2)
    assert diff > 1e-4  # the second-order term is really there


def test_maml_meta_gradient_is_the_mean_over_tasks():
    ep = _to64(SMALL.sample(3, 5, 7, torch.Generator().manual_seed(5)))
    maml = _method64("maml", inner_lr=0.1)
    g, loss = maml.meta_gradient(maml.params, ep)
    per = [maml.meta_gradient(maml.params, ep.index([t])) for t in range(3)]
    for k in g:
        torch.testing.assert_close(g[k], sum(p[0][k] for p in per) / 3, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loss, sum(p[1] for p in per) / 3)


def test_anil_changes_only_the_head():
    ep = SMALL.sample(3, 5, 5, torch.Generator().manual_seed(0))
    anil = get_method("anil", SMALL, MetaConfig(iterations=1))
    start = {k: v.expand(3, 1, *v.shape)[:, 0] for k, v in GradientMetaLearner.theta(anil.params).items()}
    after = anil.adapt(start, ep.support_x, ep.support_y, steps=3, lr=0.1)
    head = {"layers.2.weight", "layers.2.bias"}
    for k in start:
        assert torch.equal(after[k], start[k]) == (k not in head)
    g, _ = anil.meta_gradient(anil.params, ep)  # the outer loop still trains the body
    assert all(float(v.abs().max()) > 0 for v in g.values())


def test_metasgd_uses_learned_step_sizes():
    ep = SMALL.sample(2, 5, 5, torch.Generator().manual_seed(0))
    m = get_method("metasgd", SMALL, MetaConfig(iterations=1, inner_lr=0.05))
    assert torch.equal(m.params["alpha.layers.0.weight"], torch.full((8, 1), 0.05))
    m.params["alpha.layers.0.weight"] = torch.zeros(8, 1)
    start = {k: v.expand(2, *v.shape) for k, v in GradientMetaLearner.theta(m.params).items()}
    after = m.adapt(start, ep.support_x, ep.support_y, steps=1, lr=123.0)  # lr ignored
    plain = sgd_adapt(SMALL.spec, "regression", start, ep.support_x, ep.support_y, steps=1, lr=0.05)
    assert torch.equal(after["layers.0.weight"], start["layers.0.weight"])
    torch.testing.assert_close(after["layers.1.weight"], plain["layers.1.weight"])
    g, _ = m.meta_gradient(m.params, ep)
    assert set(g) == set(m.params) and float(g["alpha.layers.1.weight"].abs().max()) > 0


def test_reptile_and_pretrain_gradients():
    ep = _to64(SMALL.sample(3, 4, 4, torch.Generator().manual_seed(0)))
    rep = _method64("reptile", reptile_steps=3, inner_lr=0.1)
    g, _ = rep.meta_gradient(rep.params, ep)
    x, y = ep.pooled()
    theta = GradientMetaLearner.theta(rep.params)
    phi = sgd_adapt(SMALL.spec, "regression", {k: v.expand(3, *v.shape) for k, v in theta.items()}, x, y,
                    steps=3, lr=0.1)
    for k in theta:
        torch.testing.assert_close(g[f"theta.{k}"], theta[k] - phi[k].mean(0))
    pre = _method64("pretrain")
    g, loss = pre.meta_gradient(pre.params, ep)
    leaves = {k: v.clone().requires_grad_(True) for k, v in GradientMetaLearner.theta(pre.params).items()}
    ref = torch.stack([torch.mean((SMALL.spec.forward(leaves, x[t]) - y[t]) ** 2) for t in range(3)]).mean()
    ref.backward()
    for k, v in leaves.items():
        torch.testing.assert_close(g[f"theta.{k}"], v.grad)


# ------------------------------------------------------------------------------------------------ protocol
class _Fixed(Method):
    """Proposes given candidates (for protocol tests)."""

    name = "fixed"

    def __init__(self, spec, candidates):
        self.spec, self.kind, self.cands = spec, "regression", candidates

    def propose(self, support_x, support_y, n_candidates, generator):
        return self.cands


def test_best_of_candidates_keeps_the_lowest_support_loss():
    ep = SMALL.sample(5, 6, 6, torch.Generator().manual_seed(0))
    cands = SMALL.spec.init(5 * 4, scheme="kaiming_uniform", generator=torch.Generator().manual_seed(1))
    cands = {k: v.reshape(5, 4, *v.shape[1:]) for k, v in cands.items()}
    cands["layers.0.bias"][2, 1] = math.nan  # a diverged candidate is never kept
    kept, chosen, losses = best_of(SMALL.spec, "regression", cands, ep.support_x, ep.support_y)
    for t in range(5):
        direct = [float(torch.mean((SMALL.spec.forward({k: v[t, c] for k, v in cands.items()}, ep.support_x[t])
                                    - ep.support_y[t]) ** 2)) for c in range(4)]
        finite = [d if math.isfinite(d) else math.inf for d in direct]
        assert int(chosen[t]) == finite.index(min(finite))
        assert all(torch.equal(kept[k][t], cands[k][t, chosen[t]]) for k in kept)
    cands["layers.0.bias"][2, 1] = 0.0
    res = run_protocol(_Fixed(SMALL.spec, cands), ep, steps=(0,), n_candidates=4)
    _, chosen, losses = best_of(SMALL.spec, "regression", cands, ep.support_x, ep.support_y)
    assert torch.equal(res.chosen, chosen)
    with pytest.raises(ValueError, match="candidates"):
        run_protocol(_Fixed(SMALL.spec, cands), ep, n_candidates=2)


def test_protocol_scores_and_confidence_interval():
    ep = SMALL.sample(6, 5, 9, torch.Generator().manual_seed(0))
    cands = {k: v.unsqueeze(1) for k, v in SMALL.spec.init(6, generator=torch.Generator().manual_seed(2)).items()}
    res = run_protocol(_Fixed(SMALL.spec, cands), ep, steps=(10, 0, 1), lr=0.05, keep=2)
    assert [r.steps for r in res.results] == [0, 1, 10]
    per = ((SMALL.spec.batched_forward(cands and {k: v[:, 0] for k, v in cands.items()}, ep.query_x) - ep.query_y)
           ** 2).mean((1, 2))
    r0 = res.by_steps(0)
    assert r0.mean == pytest.approx(float(per.mean()), rel=1e-5)
    assert r0.ci95 == pytest.approx(1.96 * float(per.std()) / math.sqrt(6), rel=1e-5)
    assert r0.median == pytest.approx(float(per.sort().values[2]), rel=1e-6)  # lower middle of 6 (torch's)
    assert r0.to_dict()["median"] == r0.median
    blown = dataclasses.replace(r0, per_task=torch.tensor([0.1, math.nan, 0.3]))  # a diverged task is the worst
    assert blown.median == pytest.approx(0.3)
    ten = sgd_adapt(SMALL.spec, "regression", {k: v[:, 0] for k, v in cands.items()}, ep.support_x, ep.support_y,
                    steps=10, lr=0.05)
    torch.testing.assert_close(res.kept[10]["layers.2.bias"], ten["layers.2.bias"][:2])
    bad = {k: v.clone() for k, v in cands.items()}
    bad["layers.1.weight"][0] = math.nan
    with pytest.raises(FloatingPointError, match="NaN"):
        run_protocol(_Fixed(SMALL.spec, bad), ep)
    with pytest.raises(ValueError, match=r"must have shape \(6, C, 8, 1\)"):
        run_protocol(_Fixed(SMALL.spec, {**cands, "layers.0.weight": cands["layers.0.weight"][:, 0]}), ep)


def test_scratch_draws_fresh_candidates_and_best_of_helps():
    ep = SMALL.sample(20, 10, 20, torch.Generator().manual_seed(0))
    m = get_method("scratch", SMALL)
    c = m.propose(ep.support_x, ep.support_y, 3, torch.Generator().manual_seed(0))
    assert c["layers.0.weight"].shape == (20, 3, 8, 1) and not torch.equal(c["layers.0.weight"][:, 0],
                                                                          c["layers.0.weight"][:, 1])
    one = run_protocol(m, ep, steps=(0,), n_candidates=1, generator=torch.Generator().manual_seed(0))
    many = run_protocol(m, ep, steps=(0,), n_candidates=16, generator=torch.Generator().manual_seed(0))
    assert many.by_steps(0).support_loss < one.by_steps(0).support_loss


def test_meta_training_improves_and_nan_is_reported(tmp_path):
    m = get_method("maml", SMALL, MetaConfig(iterations=30, meta_batch=5, outer_lr=1e-2))
    test = SMALL.test_set((5,), n_tasks=30)[5]
    before = run_protocol(m, test, steps=(1,)).by_steps(1).mean
    info = m.meta_train(SMALL, generator=stream_generator(0, "train"))
    assert info["iterations"] == 30 and info["seconds"] > 0 and len(info["loss_curve"]) >= 1
    assert run_protocol(m, test, steps=(1,)).by_steps(1).mean < before
    bad = get_method("maml", SMALL, MetaConfig(iterations=5, meta_batch=5, outer_lr=1e30))
    with pytest.raises(FloatingPointError, match="maml: meta-loss .* at iteration"):
        bad.meta_train(SMALL, generator=stream_generator(0, "train"))
    # saved state: round trip, settings check, NaN refused both ways
    path = tmp_path / "maml.safetensors"
    save_method_state(m, path, info)
    again = get_method("maml", SMALL, MetaConfig(iterations=30, meta_batch=5, outer_lr=1e-2))
    assert load_method_state(again, path)["iterations"] == 30
    assert all(torch.equal(again.params[k], m.params[k]) for k in m.params)
    other = get_method("maml", SMALL, MetaConfig(iterations=31, meta_batch=5, outer_lr=1e-2))
    with pytest.raises(ValueError, match="iterations: saved 30, asked 31"):
        load_method_state(other, path)
    with pytest.raises(ValueError, match="holds the state of method 'maml'"):
        load_method_state(get_method("fomaml", SMALL, MetaConfig(iterations=30)), path)
    m.params["theta.layers.0.bias"][0] = math.nan
    with pytest.raises(FloatingPointError, match="NaN"):
        save_method_state(m, tmp_path / "nan.safetensors")
    from safetensors.torch import load, save

    raw = load(path.read_bytes())
    raw["theta.layers.0.bias"][0] = math.inf
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    (tmp_path / "inf.safetensors").write_bytes(save(raw, metadata=meta))
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        load_method_state(again, tmp_path / "inf.safetensors")


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize(
    "argv, message",
    [
        (["fewshot", "--family", "nope"], "unknown few-shot family 'nope'"),
        (["fewshot", "--family", "sinusoid", "--methods", "maml", "nope"], "unknown few-shot method(s) ['nope']"),
        (["fewshot", "--family", "sinusoid", "--shots", "0"], "--shots must be ≥ 1"),
        (["fewshot", "--family", "sinusoid", "--iterations", "0"], "iterations must be ≥ 1"),
        (["fewshot", "--family", "digits", "--shots", "500", "--methods", "scratch"], "examples of every class"),
        (["fewshot", "--family", "sinusoid", "--methods", "maml", "--method-option", "flow.query_weight=1"],
         "does not include"),
        (["fewshot", "--family", "sinusoid", "--methods", "flow", "--method-option", "flow.nope=1"],
         "unknown option(s) ['nope'] for few-shot method 'flow'"),
        (["fewshot", "--family", "sinusoid", "--methods", "flow", "--method-option", "flow.query_weight=x"],
         "flow.query_weight='x': expected float"),
        (["fewshot", "--family", "sinusoid", "--methods", "maml", "--method-option", "maml.lr=1"],
         "'maml' takes no options"),
        (["fewshot", "--family", "sinusoid", "--methods", "flow", "--method-option", "query_weight=1"],
         "expected METHOD.KEY=VALUE"),
        (["fewshot", "--family", "sinusoid", "--label", "../up"], "--label must use letters"),
        (["fewshot", "--family", "sinusoid", "--reuse-from", ".."], "--reuse-from must use letters"),
    ],
)
def test_cli_bad_input_exits_2(capsys, tmp_path, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "README.md").exists()


class _Zero(Method):
    """A plug-in method (as the task-conditioned flow registers itself): proposes the zero network."""

    name = "zero"

    def __init__(self, family, config, *, device="cpu", seed=0):
        self.spec, self.kind = family.spec, family.kind

    def propose(self, support_x, support_y, n_candidates, generator):
        t = support_x.shape[0]
        return {k: torch.zeros(t, 1, *s, device=support_x.device) for k, s in self.spec.shapes.items()}


def test_cli_end_to_end_writes_readme_and_reuses_states(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "zero", _Zero)
    assert "zero" in method_names()
    out = tmp_path / "fs"
    argv = ["fewshot", "--family", "sinusoid", "--shots", "5", "10", "--methods", "maml", "metasgd", "scratch",
            "zero", "--iterations", "3", "--tasks", "8", "--meta-batch", "4", "--plot-tasks", "2",
            "--plot-methods", "maml", "zero", "--out",
            str(out), "--json", "--device", "cpu"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["methods"]["maml"]["results"]["10"]["results"][2]["steps"] == 10
    zero = res["methods"]["zero"]["results"]["5"]["results"][0]
    assert zero["mean"] > 0 and res["methods"]["zero"]["state"] is None
    readme = (out / "README.md").read_text()
    assert "| maml | 5 |" in readme and "| zero | 10 |" in readme and "metaflow-ws fewshot --family sinusoid" in readme
    medians = readme.split("Median over the test tasks")[1].split("\n\n")[1]  # the median table
    assert f"| zero | 5 | {zero['median']:.3f} |" in medians
    assert (out / "sinusoid_fits.png").stat().st_size > 1000 and res["plot_methods"] == ["maml", "zero"]
    assert res["complete"] is True
    assert (out / "state" / "sinusoid" / "maml.safetensors").is_file()
    # a second family lands in the same files; --reuse re-scores the saved states without retraining
    assert main(["fewshot", "--family", "digits", "--methods", "anil", "--iterations", "2", "--tasks", "4",
                 "--meta-batch", "2", "--out", str(out)]) == 0
    assert main([*argv[:-3], "--reuse", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["methods"]["maml"]["train"]["reused"] is True
    for k in ("5", "10"):
        assert again["methods"]["maml"]["results"][k]["results"] == res["methods"]["maml"]["results"][k]["results"]
    # --reuse-from re-scores another section's states under a new label (here with 2 candidates)
    assert main([*argv[:-3], "--label", "sin-best2", "--candidates", "2", "--reuse-from", "sinusoid", "--json"]) == 0
    best2 = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert best2["methods"]["maml"]["train"]["reused"] is True and best2["candidates"] == 2
    assert best2["methods"]["maml"]["state"] == "state/sinusoid/maml.safetensors"
    assert main([*argv[:-3], "--label", "x", "--reuse-from", "nope"]) == 2
    assert "no saved states" in capsys.readouterr().err
    stored = json.loads((out / "results.json").read_text())["families"]
    assert set(stored) == {"sinusoid", "digits", "sin-best2"}
    readme = (out / "README.md").read_text()
    assert "## digits" in readme and "## sinusoid" in readme and "| anil | 1 |" in readme


class _Broken(_Zero):
    name = "broken"

    def meta_train(self, family, *, iterations=None, generator, log=None):
        raise FloatingPointError("broken: meta-loss nan at iteration 1")


def test_cli_keeps_finished_methods_when_a_later_one_fails(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "broken", _Broken)
    out = tmp_path / "fs"
    argv = ["fewshot", "--family", "sinusoid", "--shots", "5", "--methods", "scratch", "broken", "--tasks", "4",
            "--label", "sin-try", "--out", str(out)]
    assert main(argv) == 2
    assert "broken: meta-loss nan" in capsys.readouterr().err
    entry = json.loads((out / "results.json").read_text())["families"]["sin-try"]
    assert entry["complete"] is False and list(entry["methods"]) == ["scratch"]
    readme = (out / "README.md").read_text()
    assert "## sin-try" in readme and "still to run: broken" in readme and "| scratch | 5 |" in readme


def test_method_options_are_typed_from_the_settings_defaults():
    from metaflow_ws.fewshot.baselines import method_settings, parse_method_options
    from metaflow_ws.fewshot.conditional import FlowMethodConfig

    opts = parse_method_options(["flow.query_weight=0.5", "flow.anchor=false", "flow.residual=false",
                                 "flow.support_sizes=3,7", "flow.flow_steps=10", "flow.coupling=ot"])
    s = method_settings("flow", opts["flow"])
    assert s == FlowMethodConfig(query_weight=0.5, anchor=False, residual=False, support_sizes=(3, 7), flow_steps=10,
                                 coupling="ot")
    assert isinstance(s.flow_steps, int) and isinstance(s.query_weight, float)
    with pytest.raises(ValueError, match="expected true/false"):
        method_settings("flow", {"anchor": "maybe"})
    with pytest.raises(ValueError, match="flow_steps must be ≥ 1"):  # the settings' own validation still runs
        method_settings("flow", {"flow_steps": "0"})


def test_register_method_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_method("maml", _Zero)


@pytest.mark.slow
def test_maml_beats_pretraining_after_one_step():
    """A short sinusoid run (1,500 iterations each, ≈ 30 s on one core): MAML's init adapts in one step, the
    pooled network does not."""
    fam = get_family("sinusoid")
    test = fam.test_set((10,), n_tasks=200)[10]
    scores = {}
    for name in ("maml", "pretrain"):
        m = get_method(name, fam, MetaConfig(iterations=1500))
        m.meta_train(fam, generator=stream_generator(0, "train"))
        scores[name] = run_protocol(m, test, steps=(0, 1)).by_steps(1)
    assert scores["maml"].mean + scores["maml"].ci95 < scores["pretrain"].mean - scores["pretrain"].ci95
