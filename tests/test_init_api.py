"""init_ / sample_modules / sample_state_dicts / warm_start: exact loading, candidate choice, optimizer state,
architecture errors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from metaflow_ws import init_, sample_modules, sample_state_dicts, warm_start
from metaflow_ws.flows import FlowConfig, SampleConfig, TrainConfig, sample, train_flow
from metaflow_ws.init import candidate_losses, resolve_support, sample_params, spec_of_module
from metaflow_ws.nets import MLP, NetworkSpec

FAST = SampleConfig(steps=3)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def flow(tiny_bc_zoo):
    """A barely trained geometric flow on breast_cancer networks (30-16-16-2): quality is irrelevant here."""
    cfg = FlowConfig(flow="geometric", widths=tiny_bc_zoo.spec.widths, task="breast_cancer", d_model=8, num_layers=1)
    return train_flow(tiny_bc_zoo, cfg, TrainConfig(steps=3, batch_size=8, align=False)).flow


@pytest.fixture(scope="module")
def support():
    from metaflow_ws import get_task

    x, y = get_task("breast_cancer").data(0).split("train")
    return x[:96], y[:96]


def _sequential(widths=(30, 16, 16, 2)) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def _loss(module: nn.Module, x, y) -> torch.Tensor:
    return nn.functional.cross_entropy(module(x), y)


@pytest.mark.parametrize("make", [lambda: MLP((30, 16, 16, 2)), _sequential], ids=["MLP", "Sequential"])
def test_init_reproduces_the_decoded_sample_exactly(flow, support, make):
    x = support[0]
    raw = flow.decode(sample(flow, 1, FAST, generator=_gen(0)))  # the flow's own decoded sample
    raw1 = {k: v[0] for k, v in raw.items()}
    # balance=False: the module holds the decoded sample itself, bit for bit
    module = make()
    assert init_(module, flow, sample_config=FAST, generator=_gen(0), balance=False) is module  # in place
    assert torch.equal(module(x), flow.spec.forward(raw1, x))
    # default (balanced): exactly the sample_state_dicts sample, and the decoded sample's function
    sd = sample_state_dicts(flow, 1, sample_config=FAST, generator=_gen(0))[0]
    module = init_(make(), flow, sample_config=FAST, generator=_gen(0))
    assert torch.equal(module(x), flow.spec.forward(sd, x))
    torch.testing.assert_close(module(x), flow.spec.forward(raw1, x), rtol=1e-5, atol=1e-5)
    assert not torch.equal(sd["layers.0.weight"], raw1["layers.0.weight"])  # the scales did move


@pytest.mark.parametrize("widths", [(5, 4, 3), (5, 4, 6, 3, 2)])
def test_balance_scales_keeps_the_function_and_balances(widths):
    from metaflow_ws.init import balance_scales

    spec = NetworkSpec(widths)
    g = _gen(0)
    p = spec.init(3, std=0.5, generator=g, dtype=torch.float64)
    p["layers.0.weight"] = p["layers.0.weight"] * 10.0  # badly balanced
    x = torch.randn(7, widths[0], generator=g, dtype=torch.float64)
    q = balance_scales(spec, p, sweeps=50)
    torch.testing.assert_close(spec.batched_forward(q, x), spec.batched_forward(p, x), rtol=1e-10, atol=1e-10)
    for layer in range(spec.num_layers - 1):
        w, b, w2 = q[f"layers.{layer}.weight"], q[f"layers.{layer}.bias"], q[f"layers.{layer + 1}.weight"]
        torch.testing.assert_close((w.pow(2).sum(-1) + b.pow(2)).sqrt(), w2.norm(dim=-2), rtol=1e-6, atol=1e-8)
    tanh = NetworkSpec(widths, "tanh")
    assert all(torch.equal(p[k], v) for k, v in balance_scales(tanh, p).items())


def test_candidates_keeps_the_lowest_loss_network(flow, support):
    k = 6
    params = sample_params(flow, k, sample_config=FAST, generator=_gen(1))
    # losses by a plain loop over modules (independent of the vmapped scorer)
    losses = torch.stack([_loss(m, *support) for m in flow.spec.to_modules(params)])
    assert losses.unique().numel() == k
    torch.testing.assert_close(candidate_losses(flow.spec, params, resolve_support(data=support)), losses.detach())
    module = init_(_sequential(), flow, data=support, candidates=k, sample_config=FAST, generator=_gen(1))
    best = int(losses.argmin())
    for i, lin in enumerate(m for m in module if isinstance(m, nn.Linear)):
        assert torch.equal(lin.weight, params[f"layers.{i}.weight"][best])
        assert torch.equal(lin.bias, params[f"layers.{i}.bias"][best])


def test_task_name_gives_the_train_split(flow):
    m1 = init_(MLP((30, 16, 16, 2)), flow, task="breast_cancer", candidates=3, sample_config=FAST, generator=_gen(2))
    from metaflow_ws import get_task

    m2 = init_(MLP((30, 16, 16, 2)), flow, data=get_task("breast_cancer").data(0).split("train"), candidates=3,
               sample_config=FAST, generator=_gen(2))
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))


def test_sample_modules_and_state_dicts(flow, support):
    mods = sample_modules(flow, 3, sample_config=FAST, generator=_gen(3))
    sds = sample_state_dicts(flow, 3, sample_config=FAST, generator=_gen(3))
    assert len(mods) == len(sds) == 3 and all(isinstance(m, MLP) for m in mods)
    for m, sd in zip(mods, sds):
        assert set(sd) == set(flow.spec.names)
        assert torch.equal(m(support[0]), flow.spec.forward(sd, support[0]))
    seqs = sample_modules(flow, 3, factory=_sequential, sample_config=FAST, generator=_gen(3))
    assert all(isinstance(m, nn.Sequential) for m in seqs)
    assert torch.equal(seqs[1](support[0]), mods[1](support[0]))


def test_wrong_architecture_names_both(flow):
    with pytest.raises(ValueError, match=r"MLP 30-8-2 \(relu\).*MLP 30-16-16-2 \(relu\)"):
        init_(_sequential((30, 8, 2)), flow)
    with pytest.raises(ValueError, match="MLP 64-16-16-2.*MLP 30-16-16-2.*train a flow"):
        init_(MLP((64, 16, 16, 2)), flow, width_transfer=True)  # other input size: no transfer possible
    with pytest.raises(ValueError, match="width_transfer=True"):
        init_(MLP((30, 32, 16, 2)), flow)
    with pytest.raises(ValueError, match="supported modules"):
        init_(nn.Conv1d(1, 1, 3), flow)
    with pytest.raises(ValueError, match="nn.Sequential"):
        init_(nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2), nn.ReLU()), flow)  # trailing act
    with pytest.raises(ValueError, match="nn.Sequential"):
        init_(nn.Sequential(nn.Linear(30, 16, bias=False), nn.ReLU(), nn.Linear(16, 2)), flow)
    assert spec_of_module(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))) == NetworkSpec((3, 4, 2), "tanh")


def test_missing_task_data_is_a_clear_error(flow):
    with pytest.raises(ValueError, match="task= or data="):
        init_(MLP((30, 16, 16, 2)), flow, candidates=4)
    with pytest.raises(ValueError, match="task= or data="):
        init_(MLP((30, 16, 16, 2)), flow, sample_config=SampleConfig(steps=2, guidance=0.1))


@pytest.mark.parametrize("widths", [(30, 32, 8, 2), (30, 16, 12, 16, 2)])  # another width, another depth
def test_width_transfer_loads_the_transferred_sample(flow, support, widths):
    spec = NetworkSpec(widths)
    sd = sample_state_dicts(flow, 1, spec=spec, sample_config=FAST, generator=_gen(4))[0]
    module = init_(MLP(spec.widths), flow, width_transfer=True, sample_config=FAST, generator=_gen(4))
    assert sd["layers.0.weight"].shape == (widths[1], 30) and len(sd) == 2 * spec.num_layers
    assert torch.equal(module(support[0]), spec.forward(sd, support[0]))


@pytest.mark.parametrize("widths", [(30, 32, 16, 2), (30, 16, 16, 16, 24, 2)])  # wider; deeper and wider
def test_grow_loads_the_flows_own_sample_grown_to_the_module(flow, support, widths):
    """width_transfer="grow": the module computes the function of the flow's own sample for the same generator."""
    x = support[0]
    own = sample_state_dicts(flow, 1, sample_config=FAST, generator=_gen(5))[0]
    module = init_(_sequential(widths), flow, width_transfer="grow", sample_config=FAST, generator=_gen(5))
    assert module[0].weight.shape == (widths[1], 30)
    torch.testing.assert_close(module(x), flow.spec.forward(own, x), rtol=1e-5, atol=1e-5)
    sd = sample_state_dicts(flow, 1, spec=NetworkSpec(widths), grow=True, sample_config=FAST, generator=_gen(5))[0]
    assert all(torch.equal(a, b) for a, b in zip(sd.values(), module.state_dict().values()))
    mods = sample_modules(flow, 2, factory=lambda: MLP(widths), width_transfer="grow", sample_config=FAST,
                          generator=_gen(6))
    assert not torch.equal(mods[0](x), mods[1](x))  # two draws
    net, _ = warm_start(MLP(widths), functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9), flow, support,
                        candidates=2, width_transfer="grow", sample_config=FAST, generator=_gen(7))
    assert torch.isfinite(net(x)).all()


def test_grow_errors_name_the_problem(flow):
    with pytest.raises(ValueError, match="grow only adds neurons"):
        init_(MLP((30, 8, 16, 2)), flow, width_transfer="grow", sample_config=FAST)
    with pytest.raises(ValueError, match="fewer layers"):
        init_(MLP((30, 16, 2)), flow, width_transfer="grow", sample_config=FAST)
    with pytest.raises(ValueError, match="width_transfer='grow'"):  # the hint names both options
        init_(MLP((30, 32, 16, 2)), flow, sample_config=FAST)
    with pytest.raises(ValueError, match="must be True, False or 'grow'"):
        init_(MLP((30, 32, 16, 2)), flow, width_transfer="yes", sample_config=FAST)


def _manual_grads(flow, support, k, m, bs, seed, balance):
    """Gradients of every candidate on the warm-start minibatches, recomputed with autograd on modules."""
    g = _gen(seed)
    params = sample_params(flow, k, sample_config=FAST, generator=g, balance=balance)  # warm_start's draws
    idx = [torch.randperm(support[0].shape[0], generator=g)[:bs] for _ in range(m)]
    out = []
    for mod in flow.spec.to_modules(params):
        per = []
        for i in idx:
            mod.zero_grad()
            _loss(mod, support[0][i], support[1][i]).backward()
            per.append(mod.layers[0].weight.grad.clone())
        out.append(torch.stack(per))
    return params, torch.stack(out)  # [k, m, 16, 30] gradients of layers.0.weight


def test_warm_start_adam_state_versus_a_fresh_adam(flow, support):
    k, m, bs = 4, 3, 32
    params, g0 = _manual_grads(flow, support, k, m, bs, seed=5, balance=False)  # Adam: the decoded scales
    losses = candidate_losses(flow.spec, params, resolve_support(data=support))
    best = int(losses.argmin())

    fresh_model = _sequential()
    fresh = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    model, opt = warm_start(_sequential(), functools.partial(torch.optim.Adam, lr=1e-3), flow, support,
                            candidates=k, grad_batches=m, batch_size=bs, sample_config=FAST, generator=_gen(5))
    assert len(fresh.state) == 0  # a fresh Adam knows nothing before its first step
    st = opt.state[model[0].weight]
    s = k * m
    assert float(st["step"]) == s
    assert torch.equal(model[0].weight, params["layers.0.weight"][best])
    torch.testing.assert_close(st["exp_avg"], (1 - 0.9**s) * g0[best].mean(0))
    torch.testing.assert_close(st["exp_avg_sq"], (1 - 0.999**s) * g0.pow(2).mean((0, 1)))
    assert len(opt.state) == len(list(model.parameters()))
    # the state has the layout torch creates itself: a fresh Adam after one step has the same keys and dtypes,
    # and the state survives a state_dict round trip
    fresh_model(support[0]).sum().backward()
    fresh.step()
    ref = fresh.state[fresh_model[0].weight]
    assert {kk: (v.dtype, v.shape) for kk, v in st.items()} == {kk: (v.dtype, v.shape) for kk, v in ref.items()}
    reloaded = torch.optim.Adam(model.parameters(), lr=1e-3)
    reloaded.load_state_dict(opt.state_dict())
    # the first step is finite and lowers the loss on the task data
    before = _loss(model, *support)
    opt.zero_grad()
    before.backward()
    opt.step()
    after = _loss(model, *support)
    assert torch.isfinite(after) and all(torch.isfinite(p).all() for p in model.parameters())
    assert after < before.detach()


def test_warm_start_with_an_existing_optimizer_sgd_and_adamw(flow, support):
    model = MLP((30, 16, 16, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    out_model, out_opt = warm_start(model, sgd, flow, support, candidates=2, grad_batches=2, batch_size=16,
                                    sample_config=FAST, generator=_gen(6))
    assert out_model is model and out_opt is sgd
    assert all("momentum_buffer" in sgd.state[p] for p in model.parameters())
    # SGD gets rebalanced candidates (the decoded scales make it diverge), Adam the decoded ones; balance= overrides
    x = support[0]
    for opt, balance in [(lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9), True),
                         (functools.partial(torch.optim.Adam, lr=1e-3), False)]:
        for override in (None, not balance):
            m_, _ = warm_start(MLP((30, 16, 16, 2)), opt, flow, support, candidates=2, sample_config=FAST,
                               generator=_gen(8), balance=override)
            ref = sample_params(flow, 2, sample_config=FAST, generator=_gen(8),
                                balance=balance if override is None else override)
            best = int(candidate_losses(flow.spec, ref, resolve_support(data=support)).argmin())
            assert torch.equal(m_.layers[0].weight, ref["layers.0.weight"][best])
            torch.testing.assert_close(m_(x), flow.spec.forward({kk: v[best] for kk, v in ref.items()}, x))
    model2, adamw = warm_start(MLP((30, 16, 16, 2)), lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1,
                                                                                  amsgrad=True),
                               flow, support, candidates=2, sample_config=FAST, generator=_gen(6))
    st = adamw.state[model2.layers[0].weight]
    assert torch.equal(st["max_exp_avg_sq"], st["exp_avg_sq"])
    # moments=False: weights from the flow, optimizer untouched
    _, plain = warm_start(MLP((30, 16, 16, 2)), functools.partial(torch.optim.Adam, lr=1e-3), flow, support,
                          candidates=2, moments=False, sample_config=FAST, generator=_gen(6))
    assert len(plain.state) == 0
    with pytest.warns(UserWarning, match="RMSprop"):
        warm_start(MLP((30, 16, 16, 2)), torch.optim.RMSprop, flow, support, candidates=2, sample_config=FAST)
    with pytest.raises(ValueError, match="does not hold the model's parameters"):
        warm_start(MLP((30, 16, 16, 2)), torch.optim.Adam(MLP((30, 16, 16, 2)).parameters()), flow, support,
                   candidates=2, sample_config=FAST)
