"""Family zoos (one dataset per network) and task-conditioned flows (support-set encoder + conditional training)."""

from __future__ import annotations

import pytest
import torch

from metaflow_ws.flows import FlowConfig, SampleConfig, TrainConfig, WeightFlow, sample, train_flow
from metaflow_ws.flows.train import SupportSets, query_loss
from metaflow_ws.models import SetEncoder, SetEncoderConfig
from metaflow_ws.train import train_population
from metaflow_ws.train.family import family_members, family_support, train_family


@pytest.fixture(scope="module")
def sin_family():
    return train_family("sinusoid", 4, 2, epochs=3, seed=1)


def test_family_network_equals_population_on_its_member():
    """Network i of an (independent-init) family zoo is network i of a population trained on member i alone."""
    fam = train_family("sinusoid", 3, 1, epochs=2, seed=5, shared_init=False)
    members = family_members("sinusoid", [0, 1, 2])
    last = fam.step == fam.step.max()
    for i, member in enumerate(members):
        pop = train_population(member, 3, epochs=2, seed=5, evaluate=False)
        ref = pop.flat()[pop.step == pop.step.max()][i]
        assert torch.allclose(fam.flat()[last][i], ref, atol=1e-6)


def test_family_zoo_metadata_and_shared_init(sin_family):
    z = sin_family
    per_run = z.step.unique().numel()
    assert len(z) == 4 * 2 * per_run
    assert torch.equal(z.metrics["task_id"].long(), torch.arange(4).repeat_interleave(2 * per_run))
    amp = z.metrics["task.amplitude"]
    for t in range(4):  # the stored task parameters are the member's
        info = family_members("sinusoid", [t])[0].data(0).info
        assert torch.allclose(amp[z.metrics["task_id"] == t], torch.tensor(info["amplitude"], dtype=amp.dtype))
    assert "test_mse" in z.metrics and torch.isfinite(z.metrics["test_mse"]).all()
    shared = train_family("sinusoid", 3, 1, epochs=1, seed=0)  # one shared init: networks differ only by data
    noshare = train_family("sinusoid", 3, 1, epochs=1, seed=0, shared_init=False)
    d_shared = (shared.flat()[0] - shared.flat()[-1]).norm()
    d_indep = (noshare.flat()[0] - noshare.flat()[-1]).norm()
    assert d_shared < 0.5 * d_indep


def test_family_errors():
    with pytest.raises(ValueError, match="not a known family"):
        train_family("breast_cancer", 2)
    with pytest.raises(ValueError, match="≥ 1"):
        train_family("sinusoid", 0)
    z = train_population("breast_cancer", 2, epochs=1)
    with pytest.raises(ValueError, match="not a family zoo"):
        family_support(z)


def test_support_sets_draw_from_each_networks_task(sin_family):
    sup = family_support(sin_family)
    idx = torch.arange(len(sin_family))
    sx, sy = sup.draw(idx, 7, torch.Generator().manual_seed(0))
    assert sx.shape == (len(idx), 7, 1) and sy.shape == (len(idx), 7, 1)
    amp = sin_family.metrics["task.amplitude"].float()
    phase = sin_family.metrics["task.phase"].float()
    expect = amp.view(-1, 1, 1) * torch.sin(sx - phase.view(-1, 1, 1))
    assert torch.allclose(sy, expect, atol=1e-4)  # every support point lies on the network's own sinusoid
    assert all(sx[i].unique().numel() == 7 for i in range(len(idx)))  # distinct points
    with pytest.raises(ValueError, match="cannot draw"):
        sup.draw(idx, 10_000)
    with pytest.raises(ValueError, match="support data must be"):
        SupportSets(torch.zeros(3, 4), torch.zeros(3, 4, 1), torch.zeros(2, dtype=torch.long))


def test_set_encoder_is_permutation_invariant_and_checks_shapes():
    enc = SetEncoder(SetEncoderConfig(x_dim=2, y_dim=3, cond_dim=8)).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 6, 2, generator=g, dtype=torch.float64), torch.randn(4, 6, 3, generator=g, dtype=torch.float64)
    perm = torch.randperm(6, generator=g)
    assert torch.allclose(enc(x, y), enc(x[:, perm], y[:, perm]), atol=1e-12)
    assert not torch.allclose(enc(x, y), enc(x, y.flip(0)))  # different tasks, different embeddings
    with pytest.raises(ValueError, match="support sets must be"):
        enc(x, y[:, :5])


def _cond_config(zoo, **kw):
    return FlowConfig(flow="euclidean", widths=zoo.spec.widths, d_model=8, num_layers=1, cond_dim=8,
                      encoder={"x_dim": 1, "y_dim": 1, "hidden": 16}, **kw)


def test_conditional_training_resumes_exactly_and_round_trips(sin_family, tmp_path):
    sup = family_support(sin_family)
    tc = TrainConfig(steps=8, batch_size=6, coupling="independent", align=False, checkpoint_every=3, query_weight=0.5,
                     query_steps=2, query_points=5)
    straight = train_flow(sin_family, _cond_config(sin_family), tc, tmp_path / "a", support=sup)

    def interrupt(step, total, loss, sps):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_flow(sin_family, _cond_config(sin_family), tc, tmp_path / "b", support=sup, progress=interrupt)
    resumed = train_flow(sin_family, _cond_config(sin_family), tc, tmp_path / "b", support=sup, resume=True)
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses
    loaded = WeightFlow.from_pretrained(tmp_path / "a")
    assert loaded.encoder is not None
    sx, sy = sup.draw(torch.arange(5), 6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.embed(sx, sy), straight.flow.embed(sx, sy))
        cond = loaded.embed(sx, sy)
        a = sample(loaded, 5, SampleConfig(steps=3), cond=cond, generator=torch.Generator().manual_seed(0))
        b = sample(straight.flow, 5, SampleConfig(steps=3), cond=cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_query_loss_trains_the_encoder_through_the_sampler(sin_family):
    torch.manual_seed(0)
    flow = WeightFlow(_cond_config(sin_family))
    # the task projection starts at zero (cond has no effect yet); perturb it so gradients reach the encoder
    torch.nn.init.normal_(flow.field.cond_in.weight, std=0.1)
    sup = family_support(sin_family)
    idx = torch.arange(6)
    sx, sy = sup.draw(idx, 5)
    qx, qy = sup.draw(idx, 9)
    loss = query_loss(flow, flow.embed(sx, sy), qx, qy, "regression", steps=2)
    loss.backward()
    assert loss.isfinite()
    assert flow.encoder.phi[0].weight.grad.abs().sum() > 0
    assert flow.field.layers[0].parameters().__next__().grad is not None


def test_conditional_training_errors(sin_family):
    sup = family_support(sin_family)
    cfg = _cond_config(sin_family)
    with pytest.raises(ValueError, match="independent"):
        train_flow(sin_family, cfg, TrainConfig(steps=1, align=False, coupling="ot"), support=sup)
    with pytest.raises(ValueError, match="both a flow config with an encoder and support"):
        train_flow(sin_family, cfg, TrainConfig(steps=1, align=False, coupling="independent"))
    with pytest.raises(ValueError, match="cond_dim"):
        FlowConfig(flow="euclidean", widths=(1, 4, 1), encoder={"x_dim": 1, "y_dim": 1})
    with pytest.raises(ValueError, match="not task-conditioned"):
        WeightFlow(FlowConfig(flow="euclidean", widths=(1, 4, 1))).embed(torch.zeros(1, 2, 1), torch.zeros(1, 2, 1))


def test_zoo_cli_family(tmp_path):
    from metaflow_ws.cli import main
    from metaflow_ws.io import Zoo

    out = tmp_path / "fam.safetensors"
    assert main(["zoo", "sinusoid", "--family", "3", "--runs", "2", "--epochs", "2", "--out", str(out)]) == 0
    z = Zoo.load(out)
    assert z.info["family"]["members"] == [0, 1, 2] and z.num_runs == 6
    assert family_support(z).x.shape[0] == 3


def test_flow_method_runs_the_fewshot_protocol(tmp_path):
    """The flow is a registered few-shot method: meta-trains (zoo + flow), proposes candidates, saves state."""
    from metaflow_ws.fewshot.baselines import get_method, method_names
    from metaflow_ws.fewshot.conditional import FlowMethod, FlowMethodConfig
    from metaflow_ws.fewshot.episodes import get_family, stream_generator
    from metaflow_ws.fewshot.protocol import run_protocol

    assert "flow" in method_names()
    fam = get_family("sinusoid")
    settings = FlowMethodConfig(tasks=12, net_epochs=2, flow_steps=3, d_model=8, num_layers=1, sample_steps=2,
                                zoo_init_iterations=4)
    m = FlowMethod(fam, settings=settings)
    info = m.meta_train(fam, iterations=100, generator=stream_generator(0, "train"))
    assert info["flow_steps"] == 3 and info["zoo_networks"] == 12 * 2  # 2 epochs → both kept
    assert info["zoo_init"] == "maml" and info["zoo_init_iterations"] == 4
    ep = fam.test_set([5], n_tasks=4)[5]
    cand = m.propose(ep.support_x, ep.support_y, 3, torch.Generator().manual_seed(0))
    assert cand["layers.0.weight"].shape == (4, 3, 40, 1)
    r = run_protocol(m, ep, steps=[0, 1], lr=0.01, n_candidates=3, generator=stream_generator(0, "propose"))
    assert all(torch.isfinite(torch.tensor(s.mean)) for s in r.results)
    with pytest.raises(ValueError, match="other model settings"):
        get_method("flow", fam, seed=0).load_state_dict(m.state_dict())
    other = FlowMethod(fam, settings=settings, seed=5)
    other.load_state_dict(m.state_dict())
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(other.propose(ep.support_x, ep.support_y, 2, g())["layers.1.weight"],
                       m.propose(ep.support_x, ep.support_y, 2, g())["layers.1.weight"])


def test_flow_method_zoo_starts_from_a_meta_learned_init(monkeypatch):
    """``zoo_init="maml"``: the zoo's shared init (and the flow's anchor) is what a MAML run of
    ``zoo_init_iterations`` on the same meta-training stream learns; ``"random"`` is the seed's Kaiming init."""
    from metaflow_ws.fewshot.baselines import MAML, METHODS, MetaConfig, get_method
    from metaflow_ws.fewshot.conditional import FlowMethod, FlowMethodConfig, zoo_inits
    from metaflow_ws.fewshot.episodes import get_family, stream_generator

    fam = get_family("sinusoid")
    meta = MetaConfig(meta_batch=4)
    m = FlowMethod(fam, meta, settings=FlowMethodConfig(zoo_init_iterations=6))
    init, info = m.shared_initialization(stream_generator(0, "train"))
    ref = get_method("maml", fam, MetaConfig(meta_batch=4, iterations=6), seed=0)
    ref.meta_train(fam, generator=stream_generator(0, "train"))
    for n, v in init.items():
        assert v.shape == (1, *ref.params[f"theta.{n}"].shape)
        assert torch.equal(v[0], ref.params[f"theta.{n}"])
    assert info["zoo_init"] == "maml" and info["zoo_init_seconds"] >= 0
    untrained = fam.spec.init(1, scheme="kaiming_uniform", generator=stream_generator(0, "init"))
    assert not torch.equal(init["layers.0.weight"], untrained["layers.0.weight"])  # 6 Adam steps moved it
    rnd, info = FlowMethod(fam, meta, settings=FlowMethodConfig(zoo_init="random")).shared_initialization(
        stream_generator(0, "train"))
    assert info == {"zoo_init": "random"} and torch.equal(rnd["layers.0.weight"], untrained["layers.0.weight"])
    with pytest.raises(ValueError, match="zoo_init must be one of random, maml"):
        FlowMethodConfig(zoo_init="mamll")
    assert zoo_inits() == ("random", "maml", "fomaml", "anil", "metasgd", "reptile", "pretrain")  # not scratch

    class MyMAML(MAML):  # a learner registered later is a valid zoo init too
        pass

    monkeypatch.setitem(METHODS, "mymaml", MyMAML)
    assert zoo_inits()[-1] == "mymaml" and FlowMethodConfig(zoo_init="mymaml").zoo_init == "mymaml"


def test_flow_method_zoo_is_trained_with_the_fine_tuning_sgd():
    """Default zoo recipe: plain SGD at the fine-tuning rate (``MetaConfig.inner_lr``) on minibatches of
    ``net_batch`` points — one epoch over 5 points is exactly one protocol adaptation step."""
    from metaflow_ws.fewshot.baselines import MetaConfig
    from metaflow_ws.fewshot.conditional import FlowMethod, FlowMethodConfig
    from metaflow_ws.fewshot.episodes import get_family, stream_generator
    from metaflow_ws.fewshot.protocol import sgd_adapt

    fam = get_family("sinusoid")
    settings = FlowMethodConfig(tasks=3, task_points=5, net_epochs=1, net_batch=5, keep=1, zoo_init="random")
    m = FlowMethod(fam, MetaConfig(inner_lr=0.05), settings=settings)
    zoo, support, _ = m.family_zoo(stream_generator(0, "train"))
    init = {n: v.expand(3, *v.shape[1:]) for n, v in m.shared_init.items()}
    ref = sgd_adapt(fam.spec, "regression", init, support.x, support.y, steps=1, lr=0.05)
    torch.testing.assert_close(zoo.flat(), fam.spec.flatten(ref), rtol=1e-5, atol=1e-6)
    for bad, msg in (({"net_optimizer": "rmsprop"}, "net_optimizer must be 'sgd' or 'adam'"),
                     ({"net_lr": -1.0}, "net_lr must be ≥ 0"), ({"net_batch": 0}, "net_batch must be ≥ 1")):
        with pytest.raises(ValueError, match=msg):
            FlowMethodConfig(**bad)


def test_residual_flow_method_models_the_change_from_the_init():
    """``residual=True``: the flow is trained on ``w − init`` with the anchor at the residuals' per-block scale,
    proposals add the init back, and the init travels with the saved state."""
    from metaflow_ws.flows.flow import _blocks
    from metaflow_ws.fewshot.conditional import INIT_PREFIX, FlowMethod, FlowMethodConfig
    from metaflow_ws.fewshot.episodes import get_family, stream_generator

    fam = get_family("sinusoid")
    settings = FlowMethodConfig(tasks=6, net_epochs=2, zoo_init="random", flow_steps=2, d_model=8, num_layers=1)
    m = FlowMethod(fam, settings=settings)
    zoo, _, _ = m.family_zoo(stream_generator(0, "train"))
    delta, anchor = m._residual_zoo(zoo)
    init = fam.spec.flatten(m.shared_init)
    torch.testing.assert_close(delta.flat() + init, zoo.flat())
    r = m.flow.encode(delta.params)
    for lo, hi in _blocks(fam.spec, anchor.numel()):  # anchor / residual RMS has unit RMS in every block
        ratio = anchor[lo:hi].pow(2).mean().sqrt() / r[:, lo:hi].pow(2).mean().sqrt()
        torch.testing.assert_close(ratio, torch.tensor(1.0))
    m.meta_train(fam, generator=stream_generator(0, "train"))
    state = m.state_dict()
    assert torch.equal(state[f"{INIT_PREFIX}layers.0.weight"], m.shared_init["layers.0.weight"])
    ep = fam.test_set([5], n_tasks=3)[5]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    fresh = FlowMethod(fam, settings=settings)
    with pytest.raises(RuntimeError, match="meta-train the method or load a saved state"):
        fresh.propose(ep.support_x, ep.support_y, 1, g())
    fresh.load_state_dict(state)
    got = fresh.propose(ep.support_x, ep.support_y, 2, g())
    assert torch.equal(got["layers.2.bias"], m.propose(ep.support_x, ep.support_y, 2, g())["layers.2.bias"])
    # the proposal is the init plus the flow's sample, decoded
    from metaflow_ws.flows.sampling import SampleConfig, sample

    flow = m.flow.eval()
    cond = flow.embed(ep.support_x, ep.support_y).repeat_interleave(2, 0)
    gen = g()
    x = sample(flow, 6, SampleConfig(steps=settings.sample_steps, rho=1.0), cond=cond, x0=flow.sample_prior(6, generator=gen))
    want = flow.decode(x)["layers.0.weight"] + m.shared_init["layers.0.weight"]
    torch.testing.assert_close(got["layers.0.weight"].reshape(6, 40, 1), want)
    with pytest.raises(ValueError, match="lacks the shared initialisation"):
        FlowMethod(fam, settings=settings).load_state_dict({k: v for k, v in state.items()
                                                            if not k.startswith(INIT_PREFIX)})
    with pytest.raises(ValueError, match="residual=true needs anchor=true"):
        FlowMethodConfig(anchor=False)
    # the query-set loss evaluates init + sample: an offset of zero changes nothing, the init changes the loss
    from metaflow_ws.flows.train import query_loss

    qx, qy = ep.query_x[:, :7], ep.query_y[:, :7]
    emb = flow.embed(ep.support_x, ep.support_y)
    q = lambda off: query_loss(flow, emb, qx, qy, "regression", steps=2,  # noqa: E731
                               generator=torch.Generator().manual_seed(3), offset=off)
    zero = {n: torch.zeros_like(v) for n, v in m.shared_init.items()}
    torch.testing.assert_close(q(zero), q(None))
    x = flow.sample_prior(3, generator=torch.Generator().manual_seed(3))
    for i in range(2):
        x = x + flow.velocity(x, torch.full((3,), i / 2), emb) / 2
    nets = {n: v + m.shared_init[n] for n, v in flow.decode(x).items()}
    want = torch.stack([(fam.spec.forward({n: v[j] for n, v in nets.items()}, qx[j]) - qy[j]).pow(2).mean()
                        for j in range(3)]).mean()
    torch.testing.assert_close(q(m.shared_init), want, rtol=1e-4, atol=1e-5)


def test_fewshot_cli_sets_flow_options(capsys, tmp_path):
    """``--method-option flow.KEY=VALUE`` reaches the flow's settings, is recorded, and guards ``--reuse``."""
    import json

    from metaflow_ws.cli import main

    out = tmp_path / "fs"
    opts = ["flow.tasks=6", "flow.net_epochs=2", "flow.zoo_init=random", "flow.d_model=8", "flow.num_layers=1",
            "flow.query_weight=0.5", "flow.query_steps=2", "flow.flow_steps=2"]
    argv = ["fewshot", "--family", "sinusoid", "--shots", "5", "--methods", "flow", "--tasks", "3",
            "--iterations", "2", "--plot-tasks", "0", "--out", str(out), "--device", "cpu"]
    for o in opts:
        argv += ["--method-option", o]
    assert main([*argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method_options"]["flow"]["query_weight"] == "0.5"
    assert "`query_weight=0.5`" in (out / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(str(out / "state" / "sinusoid" / "flow.safetensors"), framework="pt") as fh:  # saved settings
        config = json.loads(fh.metadata()["config"])
    assert config["settings"]["query_weight"] == 0.5 and config["settings"]["d_model"] == 8
    # reusing the state with other options is refused with the difference named
    bad = [a if a != "flow.query_weight=0.5" else "flow.query_weight=1" for a in argv]
    assert main([*bad, "--reuse"]) == 2
    assert "query_weight" in capsys.readouterr().err


def test_a_family_sets_its_own_method_defaults_under_explicit_options():
    """``Family.method_defaults``: the flow method built for the family (by ``get_method`` or directly) starts
    from the family's settings; ``--method-option`` values still win; a bad key names the family."""
    from typing import ClassVar

    from metaflow_ws.fewshot.baselines import get_method, method_settings
    from metaflow_ws.fewshot.conditional import FlowMethod, FlowMethodConfig
    from metaflow_ws.fewshot.episodes import SinusoidFamily

    class Picky(SinusoidFamily):
        method_defaults: ClassVar[dict] = {"flow": {"zoo_init": "random", "tasks": 7}}

    fam = Picky()
    assert get_method("flow", fam).settings == FlowMethodConfig(zoo_init="random", tasks=7)
    assert FlowMethod(fam).settings == FlowMethodConfig(zoo_init="random", tasks=7)
    assert get_method("flow", fam, options={"tasks": "9"}).settings == FlowMethodConfig(zoo_init="random", tasks=9)
    assert get_method("flow", SinusoidFamily()).settings == FlowMethodConfig()  # no defaults: the dataclass's
    assert get_method("maml", fam).name == "maml"  # other methods are untouched

    class Broken(SinusoidFamily):
        method_defaults: ClassVar[dict] = {"flow": {"zoo_innit": "random"}}

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['zoo_innit'\].*family 'sinusoid'"):
        method_settings("flow", {}, Broken())
