"""MAML-family baselines written with ``torch.func`` (vmap over a meta-batch of tasks, grad through inner loops).

All meta-trained methods share one budget (:class:`MetaConfig`): ``iterations`` outer steps of Adam
(``outer_lr``) on meta-batches of ``meta_batch`` tasks, ``inner_steps`` inner SGD steps at ``inner_lr``, the same
initial network (PyTorch's default ``nn.Linear`` init drawn from the ``init`` seed stream) and the same episodes
(the ``train`` seed stream). No per-task Python loops: one iteration is one ``grad_and_value`` of a vmapped
meta-loss.

- ``maml``     second-order MAML (Finn et al. 2017): gradients flow through the inner SGD steps.
- ``fomaml``   first-order MAML: the inner gradients are treated as constants.
- ``anil``     ANIL (Raghu et al. 2020): the inner loop (and test-time adaptation) updates the head only.
- ``metasgd``  Meta-SGD (Li et al. 2017): per-parameter inner step sizes learned with the init (initialised at
               ``inner_lr``), used for test-time adaptation as well.
- ``reptile``  Reptile (Nichol et al. 2018): ``reptile_steps`` SGD steps at ``inner_lr`` on support ∪ query; the
               outer "gradient" θ − mean(φ) goes to Adam. (With one inner step Reptile is joint training.)
- ``pretrain`` one network trained with Adam on the pooled meta-training tasks (support ∪ query), then fine-tuned.
- ``scratch``  no meta-training: a fresh PyTorch-default init per test task (and per candidate).

New methods (the task-conditioned flow) join through :func:`register_method`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

from metaflow_ws.fewshot.episodes import Episodes, Family, stream_generator
from metaflow_ws.fewshot.protocol import Method, per_task_loss, sgd_adapt
from metaflow_ws.nets.spec import Params

__all__ = [
    "ANIL",
    "FOMAML",
    "MAML",
    "METHODS",
    "GradientMetaLearner",
    "MetaConfig",
    "MetaSGD",
    "MethodFactory",
    "Pretrain",
    "Reptile",
    "Scratch",
    "family_method_defaults",
    "get_method",
    "method_names",
    "method_settings",
    "parse_method_options",
    "register_method",
]


@dataclass(frozen=True)
class MetaConfig:
    """The budget every meta-trained method gets.

    ``train_shots`` / ``train_query`` default to the family's (sinusoid: K = 10 support and 10 query points;
    digits: 5 shots and 15 query examples per class)."""

    iterations: int = 20_000
    meta_batch: int = 25
    inner_lr: float = 0.01
    inner_steps: int = 1
    outer_lr: float = 1e-3
    train_shots: int | None = None
    train_query: int | None = None
    reptile_steps: int = 5
    log_every: int = 1000

    def __post_init__(self) -> None:
        for k in ("iterations", "meta_batch", "inner_steps", "reptile_steps", "log_every"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be ≥ 1; got {getattr(self, k)}")
        for k in ("inner_lr", "outer_lr"):
            v = float(getattr(self, k))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{k} must be a positive number; got {v}")
        for k in ("train_shots", "train_query"):
            v = getattr(self, k)
            if v is not None and int(v) < 1:
                raise ValueError(f"{k} must be ≥ 1; got {v}")


class GradientMetaLearner(Method):
    """Shared machinery: meta-parameters θ (and extras), the Adam outer loop, NaN checks, saved state.

    Subclasses define :meth:`meta_loss` (a pure function of the meta-parameters and a batch of episodes) or
    override :meth:`meta_gradient`."""

    name = "gradient"
    #: parameter names the inner loop updates (None = all)
    inner_trainable: frozenset[str] | None = None

    def __init__(self, family: Family, config: MetaConfig, *, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        self.family, self.spec, self.kind = family, family.spec, family.kind
        self.cfg, self.device, self.seed = config, torch.device(device), int(seed)
        g = stream_generator(seed, "init")
        init = self.spec.init(1, scheme="kaiming_uniform", generator=g)
        self.params: dict[str, Tensor] = {f"theta.{n}": v[0].to(self.device) for n, v in init.items()}
        self.params.update({k: v.to(self.device) for k, v in self.extra_parameters().items()})

    # --------------------------------------------------------------------------------------- pieces
    def extra_parameters(self) -> dict[str, Tensor]:
        """Meta-parameters besides θ (Meta-SGD's step sizes)."""
        return {}

    @staticmethod
    def theta(mp: Mapping[str, Tensor]) -> Params:
        return {k[len("theta."):]: v for k, v in mp.items() if k.startswith("theta.")}

    def step_sizes(self, mp: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        return None

    def inner(self, mp: Mapping[str, Tensor], x: Tensor, y: Tensor, *, steps: int,
              first_order: bool = False) -> Params:
        """θ adapted on each task: ``x [T, S, in]`` → ``{name: [T, ...]}``."""
        t = x.shape[0]
        theta = {n: v.expand(t, *v.shape) for n, v in self.theta(mp).items()}
        return sgd_adapt(self.spec, self.kind, theta, x, y, steps=steps, lr=self.cfg.inner_lr,
                         lrs=self.step_sizes(mp), trainable=self.inner_trainable, first_order=first_order)

    def meta_loss(self, mp: Mapping[str, Tensor], ep: Episodes) -> Tensor:
        """Mean query loss after the inner loop (second-order MAML)."""
        phi = self.inner(mp, ep.support_x, ep.support_y, steps=self.cfg.inner_steps)
        return per_task_loss(self.spec, self.kind, phi, ep.query_x, ep.query_y).mean()

    def meta_gradient(self, mp: Mapping[str, Tensor], ep: Episodes) -> tuple[dict[str, Tensor], Tensor]:
        """(gradient of the meta-loss w.r.t. every meta-parameter, meta-loss)."""
        return grad_and_value(self.meta_loss)(dict(mp), ep)

    # --------------------------------------------------------------------------------------- training
    def meta_train(self, family: Family, *, iterations: int | None = None, generator: torch.Generator,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        iterations = cfg.iterations if iterations is None else int(iterations)
        shots = cfg.train_shots or family.train_shots
        query = cfg.train_query or family.train_query
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        opt = torch.optim.Adam(list(leaves.values()), lr=cfg.outer_lr)
        curve, window, t0 = [], [], time.perf_counter()
        for it in range(1, iterations + 1):
            ep = family.sample(cfg.meta_batch, shots, query, generator).to(self.device)
            grads, loss = self.meta_gradient({k: v.detach() for k, v in leaves.items()}, ep)
            value = float(loss)
            bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
            if not math.isfinite(value) or bad:
                raise FloatingPointError(
                    f"{self.name}: meta-loss {value} / non-finite gradients {bad} at iteration {it} of {iterations}; "
                    f"lower --outer-lr (now {cfg.outer_lr}) or --inner-lr (now {cfg.inner_lr})")
            for k, v in leaves.items():
                v.grad = grads[k].detach()
            opt.step()
            window.append(value)
            if it % cfg.log_every == 0 or it == iterations:
                curve.append([it, sum(window) / len(window)])
                window = []
                if log is not None:
                    log(f"{self.name}: iteration {it}/{iterations} meta-loss {curve[-1][1]:.4f} "
                        f"({time.perf_counter() - t0:.0f} s)")
        self.params = {k: v.detach() for k, v in leaves.items()}
        return {"seconds": time.perf_counter() - t0, "iterations": iterations, "train_shots": shots,
                "train_query": query, "final_meta_loss": curve[-1][1], "loss_curve": curve}

    # --------------------------------------------------------------------------------------- protocol
    def propose(self, support_x: Tensor, support_y: Tensor, n_candidates: int,
                generator: torch.Generator) -> Params:
        t = support_x.shape[0]
        return {n: v.expand(t, 1, *v.shape) for n, v in self.theta(self.params).items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        want = {k: tuple(v.shape) for k, v in self.params.items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            raise ValueError(f"{self.name}: state does not match {self.spec.describe()}: expected {want}, got {got}")
        self.params = {k: v.to(self.device, torch.float32) for k, v in state.items()}

    def config(self) -> dict[str, Any]:
        c = asdict(self.cfg)
        c.pop("log_every")
        return {"method": self.name, "family": self.family.describe(), "seed": self.seed, **c}


class MAML(GradientMetaLearner):
    name = "maml"


class FOMAML(GradientMetaLearner):
    name = "fomaml"

    def meta_loss(self, mp: Mapping[str, Tensor], ep: Episodes) -> Tensor:
        phi = self.inner(mp, ep.support_x, ep.support_y, steps=self.cfg.inner_steps, first_order=True)
        return per_task_loss(self.spec, self.kind, phi, ep.query_x, ep.query_y).mean()


class ANIL(GradientMetaLearner):
    name = "anil"

    def __init__(self, family: Family, config: MetaConfig, **kw: Any) -> None:
        last = family.spec.num_layers - 1
        self.inner_trainable = frozenset({f"layers.{last}.weight", f"layers.{last}.bias"})
        super().__init__(family, config, **kw)

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *, steps: int, lr: float) -> Params:
        return sgd_adapt(self.spec, self.kind, params, support_x, support_y, steps=steps, lr=lr,
                         trainable=self.inner_trainable)


class MetaSGD(GradientMetaLearner):
    name = "metasgd"

    def extra_parameters(self) -> dict[str, Tensor]:
        return {f"alpha.{n}": torch.full(s, self.cfg.inner_lr) for n, s in self.spec.shapes.items()}

    def step_sizes(self, mp: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k[len("alpha."):]: v for k, v in mp.items() if k.startswith("alpha.")}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *, steps: int, lr: float) -> Params:
        """Test-time adaptation with the learned step sizes (``lr`` is not used)."""
        return sgd_adapt(self.spec, self.kind, params, support_x, support_y, steps=steps, lr=lr,
                         lrs=self.step_sizes(self.params))


class Reptile(GradientMetaLearner):
    name = "reptile"

    def meta_gradient(self, mp: Mapping[str, Tensor], ep: Episodes) -> tuple[dict[str, Tensor], Tensor]:
        x, y = ep.pooled()
        with torch.no_grad():
            phi = self.inner(mp, x, y, steps=self.cfg.reptile_steps)
            loss = per_task_loss(self.spec, self.kind, phi, ep.query_x, ep.query_y).mean()
        return {f"theta.{n}": mp[f"theta.{n}"] - v.mean(0) for n, v in phi.items()}, loss


class Pretrain(GradientMetaLearner):
    name = "pretrain"

    def meta_loss(self, mp: Mapping[str, Tensor], ep: Episodes) -> Tensor:
        x, y = ep.pooled()
        t = x.shape[0]
        theta = {n: v.expand(t, *v.shape) for n, v in self.theta(mp).items()}
        return per_task_loss(self.spec, self.kind, theta, x, y).mean()


class Scratch(Method):
    """Training from scratch: every test task (and candidate) gets a fresh PyTorch-default init."""

    name = "scratch"

    def __init__(self, family: Family, config: MetaConfig, *, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        self.family, self.spec, self.kind, self.device = family, family.spec, family.kind, torch.device(device)

    def propose(self, support_x: Tensor, support_y: Tensor, n_candidates: int,
                generator: torch.Generator) -> Params:
        t = support_x.shape[0]
        init = self.spec.init(t * n_candidates, scheme="kaiming_uniform", generator=generator)
        return {n: v.reshape(t, n_candidates, *v.shape[1:]).to(support_x.device) for n, v in init.items()}


# ------------------------------------------------------------------------------------------------ registry
#: ``factory(family, config, *, device, seed) -> Method``
MethodFactory = Callable[..., Method]

METHODS: dict[str, MethodFactory] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "anil": ANIL,
    "metasgd": MetaSGD,
    "reptile": Reptile,
    "pretrain": Pretrain,
    "scratch": Scratch,
}
#: Modules imported (when they exist) before a method is looked up, so they can register their methods.
PLUGINS: list[str] = ["metaflow_ws.fewshot.conditional"]
_loaded: set[str] = set()


def register_method(name: str, factory: MethodFactory, *, overwrite: bool = False) -> None:
    """Make a method available to :func:`get_method` and ``metaflow-ws fewshot --methods``.

    ``factory(family, config, *, device, seed)`` returns a :class:`~metaflow_ws.fewshot.protocol.Method`."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"method names are letters, digits, '-' and '_'; got {name!r}")
    if name in METHODS and not overwrite and METHODS[name] is not factory:
        raise ValueError(f"few-shot method {name!r} is already registered; pass overwrite=True to replace it")
    METHODS[name] = factory


def _load_plugins() -> None:
    for mod in PLUGINS:
        if mod not in _loaded and importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
            _loaded.add(mod)


def method_names() -> list[str]:
    """Registered method names (built-in baselines first)."""
    _load_plugins()
    return list(METHODS)


def _factory(name: str) -> MethodFactory:
    """The registered factory of ``name``; ``ValueError`` listing the registered names for an unknown one."""
    _load_plugins()
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown few-shot method {name!r}; expected one of {list(METHODS)}") from None


def _coerce(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` (a string from the command line, or already typed) as the type of the field's ``default``."""
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            low = value.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return low in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            return tuple(type(default[0])(v) for v in value.split(",")) if default else tuple(value.split(","))
    except ValueError:
        kind = "true/false" if isinstance(default, bool) else \
            ("comma-separated values like " + ",".join(map(str, default))) if isinstance(default, tuple) else \
            type(default).__name__
        raise ValueError(f"method option {name}.{key}={value!r}: expected {kind}") from None
    return value


def family_method_defaults(family: Family | None, name: str) -> dict[str, Any]:
    """The settings a family chooses for method ``name`` (``family.method_defaults[name]``; empty if none)."""
    return dict(getattr(family, "method_defaults", {}).get(name, {})) if family is not None else {}


def method_settings(name: str, options: Mapping[str, Any], family: Family | None = None) -> Any:
    """The settings object of method ``name`` (its factory's ``settings_class``, a dataclass): the dataclass
    defaults, then ``family``'s own defaults for the method (:func:`family_method_defaults`), then ``options``;
    strings are converted to each field's type. Raises ``ValueError`` for a method without settings or an
    unknown option, naming the valid ones."""
    import dataclasses

    cls = getattr(_factory(name), "settings_class", None)
    if cls is None:
        raise ValueError(f"few-shot method {name!r} takes no options (only methods with a settings_class do)")
    fields = [f.name for f in dataclasses.fields(cls)]
    base = family_method_defaults(family, name)
    for source, opts in ((f"family {getattr(family, 'name', '?')!r}'s defaults", base), ("options", options)):
        unknown = sorted(set(opts) - set(fields))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for few-shot method {name!r} in {source}; "
                             f"expected some of {fields}")
    defaults = cls()
    return cls(**{k: _coerce(name, k, v, getattr(defaults, k)) for k, v in {**base, **options}.items()})


def parse_method_options(items: list[str] | None) -> dict[str, dict[str, str]]:
    """``["flow.query_weight=1", ...]`` → ``{"flow": {"query_weight": "1"}}``; ``ValueError`` on bad syntax."""
    out: dict[str, dict[str, str]] = {}
    for item in items or []:
        head, eq, value = item.partition("=")
        method, dot, key = head.partition(".")
        if not (eq and dot and method.strip() and key.strip()):
            raise ValueError(f"--method-option {item!r}: expected METHOD.KEY=VALUE, e.g. flow.query_weight=1")
        out.setdefault(method.strip(), {})[key.strip()] = value.strip()
    return out


def get_method(name: str, family: Family, config: MetaConfig | None = None, *, device: torch.device | str = "cpu",
               seed: int = 0, options: Mapping[str, Any] | None = None) -> Method:
    """Build the method ``name``; raises ``ValueError`` listing the registered names for an unknown one.

    ``options`` set fields of the method's settings over the family's own defaults for it (see
    :func:`method_settings`), e.g. ``{"query_weight": 1}`` for ``flow``; they are passed to the factory as
    ``settings=``."""
    factory = _factory(name)
    if options or family_method_defaults(family, name):
        return factory(family, config or MetaConfig(), device=device, seed=seed,
                       settings=method_settings(name, options or {}, family))
    return factory(family, config or MetaConfig(), device=device, seed=seed)
