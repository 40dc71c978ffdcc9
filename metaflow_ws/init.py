"""Initialize ``torch.nn`` modules from weight flows, in the spirit of :mod:`torch.nn.init` and :mod:`torch.optim`.

- :func:`sample_state_dicts` / :func:`sample_modules`: draw networks from a flow as ``MLP`` state dicts or as
  modules (an :class:`~metaflow_ws.nets.spec.MLP`, or any module a ``factory`` builds).
- :func:`init_`: initialize a module **in place** from a flow sample; with ``candidates=k`` it draws ``k``
  networks, scores them all at once (``vmap``) on a support batch of the target task and keeps the lowest loss.
- :func:`warm_start`: :func:`init_` plus an optimizer whose state is set from gradients of the candidates
  (Adam/AdamW moments, SGD momentum), so training starts with calibrated step sizes instead of Adam's
  one-sample first steps.

Supported modules: :class:`~metaflow_ws.nets.spec.MLP` and ``nn.Sequential(Linear, act, Linear, ..., Linear)``
with biases and one activation module (``ReLU``, ``LeakyReLU``, ``Tanh``, ``GELU``, ``Sigmoid``, ``Identity``)
between consecutive linears. A module whose architecture differs from the flow's is an error naming both; a
module that differs only in its hidden layers (widths, and depth where the flow's field has an interior layer
to reuse) can be initialized by architecture transfer (``width_transfer=True``, see
:meth:`~metaflow_ws.flows.flow.WeightFlow.for_spec`) or, for a wider and/or deeper module, by sampling the
flow's own architecture and growing the samples without changing their function (``width_transfer="grow"``,
:func:`~metaflow_ws.nets.growth.grow`, Net2Net).

Samples are **rebalanced** by default (:func:`balance_scales`): scale-canonical flows decode to networks whose
hidden rows have unit norm and whose last layer carries the whole logit scale; moving scale between a neuron's
incoming and outgoing weights does not change the function but makes SGD from the sample train instead of
diverge (``balance=False`` keeps the decoded weights as they are). :func:`warm_start` knows the optimizer and
keeps the decoded scales for Adam/AdamW, which trains faster from them.

Randomness comes from ``generator`` only: the same generator state gives the same networks (the prior draws
and sampling noise first, then, in :func:`warm_start`, the gradient minibatches).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from metaflow_ws.nets.growth import grow as _grow
from metaflow_ws.nets.spec import MLP, NetworkSpec, Params

if TYPE_CHECKING:
    from metaflow_ws.flows.flow import WeightFlow
    from metaflow_ws.flows.sampling import SampleConfig
    from metaflow_ws.tasks.datasets import TaskData
    from metaflow_ws.tasks.registry import Task

__all__ = [
    "Support",
    "WarmStart",
    "balance_scales",
    "candidate_gradients",
    "candidate_losses",
    "init_",
    "resolve_support",
    "sample_modules",
    "sample_params",
    "sample_state_dicts",
    "spec_of_module",
    "warm_start",
]

#: What ``task`` / ``data`` may be: a task (or its name; its train split is used), a ``TaskData`` (train split),
#: ``(x, y)`` (kind inferred: integer labels → classification, float targets → regression) or ``(x, y, kind)``.
DataLike = Any

_ACTIVATIONS: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Tanh: "tanh",
    nn.GELU: "gelu",
    nn.Sigmoid: "sigmoid",
    nn.Identity: "identity",
}


class Support(NamedTuple):
    """A batch of the target task: ``x: (N, in)``, ``y: (N,)`` labels or ``(N, out)`` targets, and the kind."""

    x: Tensor
    y: Tensor
    kind: str


class WarmStart(NamedTuple):
    """What :func:`warm_start` returns: the initialized model and its optimizer, ready for ``optimizer.step()``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


# ------------------------------------------------------------------------------------------- architectures
def spec_of_module(module: nn.Module) -> NetworkSpec:
    """The :class:`NetworkSpec` of a supported module (``MLP`` or ``nn.Sequential`` of Linear + activation)."""
    if isinstance(module, MLP):
        return NetworkSpec(module.widths, module.activation)
    if isinstance(module, nn.Sequential):
        items = list(module)
        linears = items[0::2]
        acts = items[1::2]
        ok = (
            len(items) % 2 == 1
            and all(isinstance(m, nn.Linear) and m.bias is not None for m in linears)
            and all(type(m) in _ACTIVATIONS for m in acts)
        )
        names = {_activation_name(m) for m in acts} if ok else set()
        if ok and len(names) <= 1 and None not in names:
            widths = [linears[0].in_features] + [m.out_features for m in linears]
            if all(a.out_features == b.in_features for a, b in zip(linears[:-1], linears[1:])):
                return NetworkSpec(tuple(widths), names.pop() if names else "relu")
        layout = ", ".join(type(m).__name__ for m in items)
        raise ValueError(
            f"cannot initialize nn.Sequential({layout}) from a flow: expected Linear (with bias), one activation "
            f"({', '.join(t.__name__ for t in _ACTIVATIONS)}; the same one throughout, LeakyReLU with its default "
            "slope), Linear, ..., Linear, with matching sizes"
        )
    raise ValueError(
        f"cannot initialize a {type(module).__name__} from a flow; supported modules are metaflow_ws.MLP and "
        "nn.Sequential(Linear, ReLU, ..., Linear)"
    )


def _activation_name(m: nn.Module) -> str | None:
    if isinstance(m, nn.LeakyReLU) and m.negative_slope != 0.01:
        return None  # spec.forward uses the default slope
    if isinstance(m, nn.GELU) and m.approximate != "none":
        return None
    return _ACTIVATIONS[type(m)]


WidthTransfer = bool | Literal["grow"]


def _flow_for(flow: WeightFlow, spec: NetworkSpec, width_transfer: WidthTransfer, what: str = "module") -> WeightFlow:
    """``flow`` itself for its own architecture, its architecture transfer to ``spec`` when allowed, else an error.
    ``width_transfer="grow"``: ``flow`` itself (its samples are grown to ``spec`` afterwards, :func:`sample_params`)."""
    if width_transfer not in (True, False, "grow"):
        raise ValueError(f"width_transfer must be True, False or 'grow'; got {width_transfer!r}")
    if spec == flow.spec:
        return flow
    own = flow.spec
    same_frame = (spec.in_features, spec.out_features, spec.activation) == (
        own.in_features, own.out_features, own.activation)
    if width_transfer == "grow" and same_frame:
        return flow
    if width_transfer and same_frame:
        return flow.for_spec(spec)  # other hidden widths; another depth where the field has layers to reuse
    hint = ("only the hidden layers differ: pass width_transfer=True to sample it by architecture transfer, or "
            "width_transfer='grow' to grow the flow's own samples to it" if same_frame
            else "train a flow on a zoo of that architecture")
    raise ValueError(f"the {what} is an {spec.describe()} but the {flow.config.flow} flow generates "
                     f"{own.describe()} networks; {hint}")


# ------------------------------------------------------------------------------------------------- data
def resolve_support(task: Task | str | None = None, data: DataLike = None, *,
                    device: torch.device | str | None = None) -> Support | None:
    """The support batch given by ``data`` (preferred) or ``task`` (its train split, data seed 0); None if neither."""
    from metaflow_ws.tasks.datasets import TaskData
    from metaflow_ws.tasks.registry import Task as TaskCls
    from metaflow_ws.tasks.registry import get_task

    kind = None
    if task is not None:
        task = get_task(task)
        kind = task.kind
    if data is None and task is None:
        return None
    if data is None or isinstance(data, (str, TaskCls)):
        t = get_task(data if data is not None else task)
        x, y = t.data(0).split("train")
        kind = t.kind
    elif isinstance(data, TaskData):
        x, y = data.split("train")
    elif isinstance(data, Sequence) and len(data) in (2, 3) and not isinstance(data, str):
        x, y = data[0], data[1]
        if len(data) == 3:
            kind = data[2]
    else:
        raise ValueError(f"data must be a task, a TaskData, (x, y) or (x, y, kind); got {type(data).__name__}")
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError("data tensors x and y must be torch.Tensors")
    if kind is None:
        kind = "regression" if y.is_floating_point() else "classification"
    if kind not in ("classification", "regression"):
        raise ValueError(f"no loss for task kind {kind!r}: expected 'classification' or 'regression'")
    if x.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"support data must be x (N, in) and y with the same N > 0; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if device is not None:
        x, y = x.to(device), y.to(device)
    return Support(x, y, kind)


def candidate_losses(spec: NetworkSpec, params: Params, support: Support) -> Tensor:
    """Task loss of every network of a batch ``{name: [k, ...]}`` on ``support`` (vmapped): ``[k]``."""
    from metaflow_ws.train.losses import prediction_loss

    if support.x.shape[-1] != spec.in_features:
        raise ValueError(f"support inputs have {support.x.shape[-1]} features but {spec.describe()} takes "
                         f"{spec.in_features}")
    x, y = support.x.to(next(iter(params.values())).dtype), support.y

    def one(p: Params) -> Tensor:
        return prediction_loss(spec.forward(p, x), y, support.kind)

    with torch.no_grad():
        return vmap(one)(dict(params))


def candidate_gradients(spec: NetworkSpec, params: Params, support: Support, *, grad_batches: int = 4,
                        batch_size: int = 64, generator: torch.Generator | None = None) -> Params:
    """Loss gradients of every network of ``params`` (``{name: [k, ...]}``) on ``grad_batches`` minibatches of
    ``batch_size`` examples drawn from ``support`` with ``generator`` (one minibatch, the whole support, when
    ``batch_size`` covers it): ``{name: [k, M, ...]}``, one ``vmap(vmap(grad))`` call."""
    from metaflow_ws.train.losses import prediction_loss

    n = support.x.shape[0]
    bs = min(int(batch_size), n)
    m_batches = 1 if bs == n else max(1, int(grad_batches))
    idx = torch.stack([torch.randperm(n, generator=generator)[:bs] for _ in range(m_batches)]).to(support.x.device)
    xb, yb = support.x[idx].to(next(iter(params.values())).dtype), support.y[idx]

    def loss(p: Params, x: Tensor, y: Tensor) -> Tensor:
        return prediction_loss(spec.forward(p, x), y, support.kind)

    per_batch = vmap(grad(loss), in_dims=(None, 0, 0))
    return vmap(per_batch, in_dims=(0, None, None))(dict(params), xb, yb)


def balance_scales(spec: NetworkSpec, params: Params, *, sweeps: int = 3, eps: float = 1e-12) -> Params:
    """Rebalance ReLU scales: every hidden neuron's incoming weights and bias get the same norm as its outgoing
    weights (``[w_in, b] ← s·[w_in, b]``, ``w_out ← w_out / s`` with ``s = sqrt(‖w_out‖ / ‖[w_in, b]‖)``), which
    leaves the function unchanged (positive homogeneity). ``params``: ``{name: [B, ...]}``; returns a new batch.

    Scale-canonical decoding puts every hidden row on the unit sphere and the whole logit scale into the last
    layer (e.g. ×50 for digits networks), a badly conditioned start for SGD; balanced weights have the per-layer
    norms trained networks have. Exact after one sweep for one hidden layer; deeper networks take a few sweeps.
    Activations without the scaling symmetry (tanh, ...) are returned unchanged.
    """
    if not spec.positively_homogeneous:
        return dict(params)
    q = {k: v.clone() for k, v in params.items()}
    for _ in range(sweeps if spec.num_layers > 2 else 1):
        for layer in range(spec.num_layers - 1):
            w, b, w2 = q[f"layers.{layer}.weight"], q[f"layers.{layer}.bias"], q[f"layers.{layer + 1}.weight"]
            a = (w.pow(2).sum(-1) + b.pow(2)).sqrt()  # [B, n]
            c = torch.linalg.vector_norm(w2, dim=-2)  # [B, n]
            ok = (a > eps) & (c > eps)
            scale = torch.where(ok, (c / a.clamp_min(eps)).sqrt(), torch.ones_like(a))
            q[f"layers.{layer}.weight"] = w * scale.unsqueeze(-1)
            q[f"layers.{layer}.bias"] = b * scale
            q[f"layers.{layer + 1}.weight"] = w2 / scale.unsqueeze(-2)
    return q


# ---------------------------------------------------------------------------------------------- sampling
def sample_params(
    flow: WeightFlow,
    n: int,
    *,
    spec: NetworkSpec | None = None,
    task: Task | str | None = None,
    data: DataLike = None,
    sample_config: SampleConfig | None = None,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
    balance: bool = True,
    grow: bool = False,
) -> Params:
    """Draw ``n`` networks as a batch ``{name: [n, ...]}`` (ordinary weights, on the flow's device).

    ``spec``: other hidden widths or depth (architecture transfer, :meth:`WeightFlow.for_spec`); with ``grow=True``
    the flow samples its own architecture instead and the samples are grown to ``spec`` with the same functions
    (:func:`~metaflow_ws.nets.growth.grow`: wider and/or deeper only; its random copies come from ``generator``
    after the sampling draws). ``task`` / ``data``
    give the guidance batch when ``sample_config.guidance > 0``. ``cond``: task embedding ``(cond_dim,)``,
    ``(1, cond_dim)`` or ``(n, cond_dim)`` for task-conditioned flows. ``balance``: rebalance the ReLU scales
    (:func:`balance_scales`: same functions, trained-like per-layer norms); ``False`` returns
    ``flow.decode(x)`` as it is.
    """
    from metaflow_ws.flows.sampling import SampleConfig, sample

    if int(n) < 1:
        raise ValueError(f"n must be ≥ 1; got {n}")
    growing = grow and spec is not None and spec != flow.spec
    f = flow if spec is None else _flow_for(flow, spec, "grow" if growing else True, what="requested architecture")
    cfg = sample_config if sample_config is not None else SampleConfig()
    dev = f.scale.device
    guidance = None
    if cfg.guidance > 0:
        sup = resolve_support(task, data, device=dev)
        if sup is None:
            raise ValueError("guided sampling (sample_config.guidance > 0) needs the target task: pass task= or data=")
        guidance = (sup.x.to(f.scale.dtype), sup.y, sup.kind)
    if cond is not None:
        cond = cond.to(dev)
        cond = cond.reshape(1, -1).expand(int(n), -1) if cond.dim() == 1 or cond.shape[0] == 1 else cond
    x = sample(f, int(n), cfg, generator=generator, guidance_data=guidance, cond=cond)
    params = {k: v.detach() for k, v in f.decode(x).items()}
    params = balance_scales(f.spec, params) if balance else params
    return _grow(f.spec, params, spec.widths, generator=generator) if growing else params


def sample_state_dicts(flow: WeightFlow, n: int, **kwargs: Any) -> list[dict[str, Tensor]]:
    """Draw ``n`` networks as :class:`MLP` state dicts (``layers.i.weight``, ``layers.i.bias``; cloned tensors).

    Keyword arguments as :func:`sample_params`.
    """
    params = sample_params(flow, n, **kwargs)
    spec = kwargs.get("spec") or flow.spec
    return spec.to_state_dicts(params)


def sample_modules(
    flow: WeightFlow,
    n: int,
    *,
    factory: Callable[[], nn.Module] | None = None,
    width_transfer: WidthTransfer = False,
    **kwargs: Any,
) -> list[nn.Module]:
    """Draw ``n`` networks as modules: :class:`MLP` s of the flow's architecture (or of ``spec=``), or the
    modules ``factory()`` builds (e.g. an ``nn.Sequential``), each loaded with one sample.

    Keyword arguments as :func:`sample_params`; ``width_transfer`` lets ``factory`` build other hidden layers
    (``True``: architecture transfer; ``"grow"``: the flow's own samples grown to them, as :func:`init_`).
    """
    if factory is None:
        spec = kwargs.get("spec") or flow.spec
        mods: list[nn.Module] = list(spec.to_modules(sample_params(flow, n, **kwargs)))
        return mods
    mods = [factory() for _ in range(int(n))]
    spec = spec_of_module(mods[0])
    f = _flow_for(flow, spec, width_transfer)
    kwargs.pop("spec", None)
    params = sample_params(f, n, spec=spec, grow=width_transfer == "grow", **kwargs)
    for i, m in enumerate(mods):
        _load(spec, m, params, i)
    return mods


def _load(spec: NetworkSpec, module: nn.Module, params: Params, index: int) -> None:
    p = next(module.parameters())
    spec.load_into(module, {k: v[index].to(p.device, p.dtype) for k, v in params.items()})


# --------------------------------------------------------------------------------------------------- init_
def _draw_and_pick(
    module: nn.Module,
    flow: WeightFlow,
    *,
    task: Task | str | None,
    data: DataLike,
    candidates: int,
    sample_config: SampleConfig | None,
    generator: torch.Generator | None,
    cond: Tensor | None,
    width_transfer: WidthTransfer,
    balance: bool = True,
    need_support: bool = False,
) -> tuple[NetworkSpec, Params, int, Support | None]:
    if int(candidates) < 1:
        raise ValueError(f"candidates must be ≥ 1; got {candidates}")
    spec = spec_of_module(module)
    f = _flow_for(flow, spec, width_transfer)
    support = resolve_support(task, data, device=f.scale.device)
    if support is None and (candidates > 1 or need_support):
        raise ValueError(f"choosing the best of {candidates} candidates needs the target task: pass task= or data=")
    params = sample_params(f, int(candidates), spec=spec, task=task, data=data, sample_config=sample_config,
                           generator=generator, cond=cond, balance=balance, grow=width_transfer == "grow")
    best = 0
    if candidates > 1:
        assert support is not None
        losses = candidate_losses(spec, params, support)
        if not torch.isfinite(losses).any():
            raise FloatingPointError("every candidate network has a NaN/inf loss on the support data")
        best = int(torch.nan_to_num(losses, nan=float("inf")).argmin())
    return spec, params, best, support


def init_(
    module: nn.Module,
    flow: WeightFlow,
    *,
    task: Task | str | None = None,
    data: DataLike = None,
    candidates: int = 1,
    sample_config: SampleConfig | None = None,
    generator: torch.Generator | None = None,
    cond: Tensor | None = None,
    width_transfer: WidthTransfer = False,
    balance: bool = True,
) -> nn.Module:
    """Initialize ``module`` in place from a flow sample and return it.

    Args:
        module: an :class:`MLP` or ``nn.Sequential(Linear, ReLU, ..., Linear)`` of the flow's architecture.
        flow: a trained :class:`~metaflow_ws.flows.flow.WeightFlow` (e.g. ``WeightFlow.from_pretrained(dir)``).
        task, data: the target task (name / ``Task``: its train split) or a batch ``(x, y)`` / ``(x, y, kind)``;
            needed for ``candidates > 1`` and for guided sampling.
        candidates: draw this many networks and keep the one with the lowest loss on the support batch
            (all candidates are scored at once with ``vmap``).
        sample_config: solver, steps, noise and guidance strength (default ``SampleConfig()``).
        generator: source of all random draws (reproducible initializations).
        cond: task embedding for task-conditioned flows.
        width_transfer: allow a module that differs from the flow's architecture only in its hidden layers.
            ``True``: sample it by architecture transfer (widths; depth where :meth:`WeightFlow.for_spec` can
            continue the field's layers). ``"grow"``: sample the flow's own architecture and grow each sample to
            the module's, wider and/or deeper, computing the same function (:func:`~metaflow_ws.nets.growth.grow`,
            Net2Net: copied neurons with random output shares, identity layers; ReLU networks to go deeper).
        balance: rebalance the ReLU scales of the sample (:func:`balance_scales`; same function, trained-like
            per-layer norms: SGD from a raw scale-canonical sample can diverge). Pass ``False`` before training
            with Adam, which trains faster from the decoded scales (:func:`warm_start` chooses by itself).

    The module then holds exactly the sample :func:`sample_state_dicts` gives for the same generator state,
    and computes the decoded flow sample's function (bit for bit with ``balance=False``).
    """
    spec, params, best, _ = _draw_and_pick(module, flow, task=task, data=data, candidates=candidates,
                                           sample_config=sample_config, generator=generator, cond=cond,
                                           width_transfer=width_transfer, balance=balance)
    _load(spec, module, params, best)
    return module


# ---------------------------------------------------------------------------------------------- warm start
def warm_start(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    flow: WeightFlow,
    data: DataLike,
    *,
    candidates: int = 8,
    sample_config: SampleConfig | None = None,
    generator: torch.Generator | None = None,
    moments: bool = True,
    grad_batches: int = 4,
    batch_size: int = 64,
    cond: Tensor | None = None,
    width_transfer: WidthTransfer = False,
    balance: bool | None = None,
) -> WarmStart:
    """Initialize ``model`` from the flow (best of ``candidates`` on ``data``) and return it with an optimizer
    whose state is set from gradients, ready for ``optimizer.step()``.

    Args:
        model: module to initialize in place (see :func:`init_`).
        optimizer: an optimizer over ``model.parameters()`` or a factory ``params -> optimizer`` (e.g.
            ``functools.partial(torch.optim.Adam, lr=1e-3)``).
        data: the target task (name / ``Task``), a ``TaskData``, ``(x, y)`` or ``(x, y, kind)``: candidates are
            scored on it and the gradient minibatches drawn from it.
        candidates: networks drawn; the lowest-loss one initializes the model, all of them give gradients.
        moments: set the optimizer state (False: a fresh optimizer, only the weights come from the flow).
        balance: rebalance the sample's ReLU scales (see :func:`init_`). ``None`` (default): rebalance for SGD
            and other optimizers, keep the decoded scales for Adam/AdamW. Adam's per-coordinate steps do not blow
            up on the decoded networks' large last layer the way SGD's do, and on the unit-norm hidden rows the same
            step moves a neuron relatively more than on rebalanced (larger) rows: on the held-out task of
            ``metaflow-ws transfer`` the decoded scales reach the default init's final accuracy in far fewer Adam
            steps than rebalanced ones, while SGD from them diverges (``results/transfer/README.md``).
        grad_batches, batch_size: minibatches (drawn with ``generator``) on which every candidate's gradient is
            evaluated, all in one ``vmap(vmap(grad))`` call.

    Optimizer state (``moments=True``), with ``g`` the loss gradient (plus L2 weight decay where the optimizer
    adds it to the gradient) of candidate ``c`` on minibatch ``b``, ``s = candidates · grad_batches``:

    - ``Adam`` / ``AdamW``: ``step = s``; ``exp_avg = (1 − β1^s) · mean_b g[best, b]`` (the chosen network's own
      mean gradient); ``exp_avg_sq = (1 − β2^s) · mean_{c,b} g²`` (second moments pooled over all candidates,
      a far less noisy per-parameter scale than one gradient); ``max_exp_avg_sq`` likewise with ``amsgrad``.
      After Adam's bias correction the first step uses exactly these means, as if ``s`` gradients had been seen.
    - ``SGD`` with momentum: ``momentum_buffer = mean_b g[best, b]``.
    - other optimizers: state left empty (a warning says so).

    Example::

        import functools, torch
        from metaflow_ws import WeightFlow, warm_start
        flow = WeightFlow.from_pretrained("flows/digits_geo")
        net = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.ReLU(), torch.nn.Linear(10, 10))
        net, opt = warm_start(net, functools.partial(torch.optim.Adam, lr=1e-3), flow, "digits_permuted",
                              generator=torch.Generator().manual_seed(0))
        # ... then the usual loop: loss.backward(); opt.step(); opt.zero_grad()
    """
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer(model.parameters())
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"optimizer factory returned a {type(opt).__name__}, not a torch.optim.Optimizer")
    if balance is None:
        balance = not isinstance(opt, torch.optim.Adam)  # AdamW is a subclass
    spec, params, best, support = _draw_and_pick(model, flow, task=None, data=data, candidates=candidates,
                                                 sample_config=sample_config, generator=generator, cond=cond,
                                                 width_transfer=width_transfer, balance=balance,
                                                 need_support=True)
    assert support is not None
    _load(spec, model, params, best)  # in place: the optimizer holds the same Parameter objects
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    slots = {f"layers.{i}.{w}": getattr(m, w) for i, m in enumerate(linears) for w in ("weight", "bias")}
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    if not any(id(p) in held for p in slots.values()):
        raise ValueError("the optimizer does not hold the model's parameters; build it over model.parameters() "
                         "(or pass a factory)")
    if not moments:
        return WarmStart(model, opt)
    if not isinstance(opt, (torch.optim.Adam, torch.optim.SGD)):
        warnings.warn(f"warm_start sets no state for {type(opt).__name__} (Adam, AdamW and SGD with momentum are "
                      "supported); it starts fresh from the flow's weights", stacklevel=2)
        return WarmStart(model, opt)

    grads = candidate_gradients(spec, params, support, grad_batches=grad_batches, batch_size=batch_size,
                                generator=generator)
    s = int(candidates) * next(iter(grads.values())).shape[1]
    by_param = {id(p): name for name, p in slots.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = by_param.get(id(p))
            if name is None:
                continue
            g = grads[name].to(p.device, p.dtype)  # [k, M, ...]
            cand = params[name].to(p.device, p.dtype)  # [k, ...]
            _set_state(opt, group, p, g, best, cand, s)
    return WarmStart(model, opt)


def _set_state(opt: torch.optim.Optimizer, group: dict, p: Tensor, g: Tensor, best: int, cand: Tensor,
               s: int) -> None:
    """Write ``p``'s optimizer state from the candidates' gradients ``g: [k, M, *p.shape]`` and their values
    ``cand: [k, *p.shape]`` (``cand[best]`` is ``p``)."""
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if isinstance(opt, torch.optim.Adam):  # AdamW is a subclass
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))
        if wd and not decoupled:
            g = g + wd * cand.unsqueeze(1)  # the L2 term Adam adds to the gradient
        if group.get("maximize", False):
            g = -g
        b1, b2 = (float(b) for b in group["betas"])
        m_hat = g[best].mean(0)
        v_hat = g.pow(2).mean((0, 1))
        fused_like = bool(group.get("capturable")) or bool(group.get("fused"))
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 and not group.get("fused") else torch.float32
        step = torch.tensor(float(s), dtype=scalar, device=p.device if fused_like else None)
        state = {"step": step, "exp_avg": (1 - b1**s) * m_hat, "exp_avg_sq": (1 - b2**s) * v_hat}
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        opt.state[p] = state
    elif isinstance(opt, torch.optim.SGD):
        if not group.get("momentum"):
            return
        if wd:
            g = g + wd * cand.unsqueeze(1)
        if group.get("maximize", False):
            g = -g
        opt.state[p] = {"momentum_buffer": g[best].mean(0).clone()}
