"""The few-shot protocol: one code path that scores any :class:`Method` on a set of test episodes.

For every test task the method proposes initial parameters (optionally several candidates, of which the one
with the lowest support loss is kept), the kept network is fine-tuned on the support set — by default plain SGD,
vmapped over tasks with ``torch.func.vmap(grad(...))`` — and query MSE (regression) or accuracy
(classification) is measured after each requested number of steps. Results are mean ± 95 % CI
(1.96·std/√T) over the T tasks.
"""

from __future__ import annotations

import json
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from metaflow_ws.fewshot.episodes import Episodes, Family
from metaflow_ws.nets.spec import NetworkSpec, Params
from metaflow_ws.train.losses import loss_fn

__all__ = [
    "Method",
    "ProtocolResult",
    "StepResult",
    "best_of",
    "load_method_state",
    "per_task_loss",
    "run_protocol",
    "save_method_state",
    "sgd_adapt",
]


# ------------------------------------------------------------------------------------------------ helpers
def sgd_adapt(spec: NetworkSpec, kind: str, params: Params, x: Tensor, y: Tensor, *, steps: int, lr: float,
              lrs: Mapping[str, Tensor] | None = None, trainable: Collection[str] | None = None,
              first_order: bool = False) -> Params:
    """``steps`` full-batch gradient steps on each task's support set, vmapped over tasks.

    ``params: {name: [T, ...]}``, ``x: [T, S, in]``, ``y: [T, S, out]``. ``lrs`` (per-parameter step sizes of
    the parameters' own shapes, shared by all tasks) replaces ``lr`` (Meta-SGD); ``trainable`` limits the update
    to those parameter names (ANIL: the head); ``first_order`` stops gradients through the inner gradients
    (first-order MAML). Differentiable with respect to ``params`` and ``lrs`` (second-order MAML, Meta-SGD).
    """
    if steps < 0:
        raise ValueError(f"the number of adaptation steps must be ≥ 0; got {steps}")
    if steps == 0:
        return dict(params)
    loss = loss_fn(spec, kind)
    names = [n for n in spec.names if trainable is None or n in trainable]

    def one(p: Params, xs: Tensor, ys: Tensor) -> Params:
        for _ in range(steps):
            sub = {n: p[n] for n in names}
            g = grad(lambda s: loss({**p, **s}, xs, ys))(sub)
            if first_order:
                g = {n: v.detach() for n, v in g.items()}
            p = {**p, **{n: p[n] - (lr if lrs is None else lrs[n]) * g[n] for n in names}}
        return p

    return vmap(one)(dict(params), x, y)


def per_task_loss(spec: NetworkSpec, kind: str, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Task loss of each network on its own data: ``params {name: [T, ...]}``, ``x [T, n, in]`` → ``[T]``."""
    loss = loss_fn(spec, kind)
    return vmap(loss)(dict(params), x, y)


def _per_task_metric(spec: NetworkSpec, kind: str, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Query MSE (regression) or accuracy (classification) per task: ``[T]``."""
    out = spec.batched_forward(params, x)
    if kind == "regression":
        return ((out - y) ** 2).mean(dim=(1, 2))
    return (out.argmax(-1) == y.argmax(-1)).to(out.dtype).mean(1)


def best_of(spec: NetworkSpec, kind: str, candidates: Params, x: Tensor, y: Tensor) -> tuple[Params, Tensor, Tensor]:
    """Keep, per task, the candidate with the lowest support loss.

    ``candidates: {name: [T, C, ...]}``, ``x: [T, S, in]``, ``y: [T, S, out]`` → (``{name: [T, ...]}``, chosen
    index ``[T]``, support losses ``[T, C]``). Non-finite losses count as +inf (a diverged candidate is never kept
    when a finite one exists).
    """
    loss = loss_fn(spec, kind)
    losses = vmap(vmap(loss, in_dims=(0, None, None)))(dict(candidates), x, y)
    chosen = torch.nan_to_num(losses, nan=math.inf).argmin(1)
    rows = torch.arange(losses.shape[0], device=chosen.device)
    return {n: t[rows, chosen] for n, t in candidates.items()}, chosen, losses


# ------------------------------------------------------------------------------------------------ methods
class Method(ABC):
    """A few-shot learner that the protocol can score.

    Subclasses set ``name``, ``spec`` (the target architecture) and ``kind``, and implement :meth:`propose`.
    :meth:`meta_train` is a no-op by default (training from scratch); :meth:`adapt` is plain SGD on the support
    set and may be overridden (Meta-SGD's learned step sizes, ANIL's head-only updates). Methods that learn
    something expose it through :meth:`state_dict` / :meth:`load_state_dict` (tensors only) so the command can
    save it as safetensors and recompute results without retraining.
    """

    name: str = "method"
    spec: NetworkSpec
    kind: str

    def meta_train(self, family: Family, *, iterations: int | None = None, generator: torch.Generator,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Meta-train on episodes ``family.sample(...)`` drawn from ``generator`` (the ``train`` stream) for
        ``iterations`` steps (None: the method's configured budget). Returns JSON-able information; ``seconds``
        (wall time) is expected, ``final_meta_loss`` is shown when present."""
        return {"seconds": 0.0}

    @abstractmethod
    def propose(self, support_x: Tensor, support_y: Tensor, n_candidates: int,
                generator: torch.Generator) -> Params:
        """Initial parameters for T tasks: ``support_x [T, S, in]``, ``support_y [T, S, out]`` →
        ``{name: [T, C, ...]}`` with ``1 ≤ C ≤ n_candidates`` candidates per task (a deterministic method may
        return C = 1). Random draws use ``generator`` (a CPU generator of the ``propose`` stream)."""

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, *, steps: int, lr: float) -> Params:
        """Fine-tune ``{name: [T, ...]}`` for ``steps`` steps on the support sets (default: plain SGD at ``lr``).
        Called repeatedly with the steps between two measurements, so it must not keep state between calls."""
        return sgd_adapt(self.spec, self.kind, params, support_x, support_y, steps=steps, lr=lr)

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} keeps no state; got tensors {sorted(state)}")

    def config(self) -> dict[str, Any]:
        """JSON-able settings that must match for a saved state to be reused."""
        return {}


# ------------------------------------------------------------------------------------------------ protocol
@dataclass(frozen=True)
class StepResult:
    """Scores after ``steps`` adaptation steps. ``per_task: [T]`` (query MSE or accuracy)."""

    steps: int
    metric: str
    mean: float
    ci95: float
    support_loss: float
    query_loss: float
    nonfinite: int
    per_task: Tensor = field(repr=False)

    @property
    def median(self) -> float:
        """Median over tasks (a non-finite task counts as the worst): robust to the few tasks on which a
        fine-tuning blows up, which dominate the mean of a regression error."""
        v = self.per_task.double().nan_to_num(nan=math.inf if self.metric == "mse" else -math.inf)
        return float(v.median())

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "metric": self.metric, "mean": self.mean, "ci95": self.ci95,
                "median": self.median, "support_loss": self.support_loss, "query_loss": self.query_loss,
                "nonfinite": self.nonfinite}


@dataclass(frozen=True)
class ProtocolResult:
    """The protocol's output for one method and one test set."""

    method: str
    num_tasks: int
    support_size: int
    n_candidates: int
    lr: float
    results: tuple[StepResult, ...]
    seconds: float
    #: ``{steps: {name: [keep, ...]}}``: the adapted networks of the first ``keep`` tasks (for plots)
    kept: dict[int, Params] = field(default_factory=dict, repr=False)
    chosen: Tensor | None = field(default=None, repr=False)

    def by_steps(self, steps: int) -> StepResult:
        for r in self.results:
            if r.steps == steps:
                return r
        raise KeyError(f"no result after {steps} steps; have {[r.steps for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "num_tasks": self.num_tasks, "support_size": self.support_size,
                "n_candidates": self.n_candidates, "lr": self.lr, "seconds": self.seconds,
                "results": [r.to_dict() for r in self.results]}


def _mean_ci(v: Tensor) -> tuple[float, float, int]:
    finite = torch.isfinite(v)
    bad = int((~finite).sum())
    if bad:
        return math.nan, math.nan, bad
    mean = float(v.mean())
    ci = 1.96 * float(v.std()) / math.sqrt(v.numel()) if v.numel() > 1 else 0.0
    return mean, ci, 0


def run_protocol(method: Method, episodes: Episodes, *, steps: Sequence[int] = (0, 1, 10), lr: float = 0.01,
                 n_candidates: int = 1, generator: torch.Generator | None = None, keep: int = 0) -> ProtocolResult:
    """Score ``method`` on ``episodes`` (T test tasks).

    ``propose`` → keep the best of the candidates on the support loss → ``adapt`` for each number of ``steps``
    (cumulative: 10 steps continue from the network measured after 1) → per-task query MSE or accuracy;
    mean ± 1.96·std/√T. Tasks whose score is not finite (a diverged fine-tuning) make the mean NaN and are
    counted in ``nonfinite``. ``keep`` stores the adapted networks of the first ``keep`` tasks.
    """
    if episodes.kind != method.kind:
        raise ValueError(f"method {method.name!r} solves {method.kind} tasks but the episodes are {episodes.kind}")
    spec = method.spec
    if episodes.support_x.shape[-1] != spec.in_features or episodes.support_y.shape[-1] != spec.out_features:
        raise ValueError(f"episodes have {episodes.support_x.shape[-1]} inputs / {episodes.support_y.shape[-1]} "
                         f"outputs but {method.name!r} uses {spec.describe()}")
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"adaptation steps must be ≥ 0; got {steps}")
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be ≥ 1; got {n_candidates}")
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    t0 = time.perf_counter()
    sx, sy, qx, qy = episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y
    t = episodes.num_tasks
    cand = method.propose(sx, sy, n_candidates, generator)  # not under no_grad: a sampler may use guidance
    _check_proposal(method, cand, t, n_candidates)
    params, chosen, _ = best_of(spec, method.kind, {n: v.detach() for n, v in cand.items()}, sx, sy)
    metric = "mse" if method.kind == "regression" else "accuracy"
    out, kept, done = [], {}, 0
    for s in steps:
        params = {n: v.detach() for n, v in method.adapt(params, sx, sy, steps=s - done, lr=lr).items()}
        done = s
        with torch.no_grad():
            per = _per_task_metric(spec, method.kind, params, qx, qy)
            sl = per_task_loss(spec, method.kind, params, sx, sy)
            ql = per_task_loss(spec, method.kind, params, qx, qy)
        mean, ci, bad = _mean_ci(per)
        out.append(StepResult(s, metric, mean, ci, float(sl.mean()), float(ql.mean()), bad, per.cpu()))
        if keep:
            kept[s] = {n: v[:keep].cpu() for n, v in params.items()}
    return ProtocolResult(method.name, t, episodes.support_size, n_candidates, lr, tuple(out),
                          time.perf_counter() - t0, kept, chosen.cpu())


def _check_proposal(method: Method, cand: Params, t: int, n_candidates: int) -> None:
    spec = method.spec
    if not isinstance(cand, Mapping) or set(cand) != set(spec.names):
        raise ValueError(f"{method.name}.propose must return a dict with keys {spec.names}; got "
                         f"{sorted(cand) if isinstance(cand, Mapping) else type(cand).__name__}")
    c = None
    for n, shape in spec.shapes.items():
        v = cand[n]
        if v.dim() != len(shape) + 2 or v.shape[0] != t or tuple(v.shape[2:]) != shape:
            raise ValueError(f"{method.name}.propose: {n!r} must have shape ({t}, C, {', '.join(map(str, shape))}); "
                             f"got {tuple(v.shape)}")
        c = v.shape[1] if c is None else c
        if v.shape[1] != c or not 1 <= c <= n_candidates:
            raise ValueError(f"{method.name}.propose returned {v.shape[1]} candidates for {n!r}; expected the same "
                             f"1 ≤ C ≤ {n_candidates} for every parameter")
        if not torch.isfinite(v).all():
            raise FloatingPointError(f"{method.name}.propose returned NaN or infinite values in {n!r}")


# ------------------------------------------------------------------------------------------------ saved state
STATE_FORMAT = "metaflow_ws.fewshot.method"


def save_method_state(method: Method, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``method.state_dict()`` atomically as safetensors, with the method's name and :meth:`Method.config`
    in the metadata. Refuses (``FloatingPointError``) to save NaN or infinite values."""
    from safetensors.torch import save

    from metaflow_ws.io.atomic import atomic_write_bytes

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in method.state_dict().items()}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(f"{method.name}: state tensor {k!r} holds NaN or infinite values; "
                                     f"not saving {path}")
    meta = {"format": STATE_FORMAT, "method": method.name,
            "config": json.dumps(method.config(), sort_keys=True, default=str),
            "info": json.dumps(dict(info or {}), sort_keys=True, default=str)}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_method_state(method: Method, path: str | os.PathLike) -> dict[str, Any]:
    """Load a state written by :func:`save_method_state` into ``method``; returns the stored ``info``.

    Raises ``FileNotFoundError`` (no file), ``ValueError`` (not such a file, another method, or settings that
    differ from ``method.config()``) or ``FloatingPointError`` (NaN / infinite values)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved state for method {method.name!r} at {path}")
    raw = path.read_bytes()
    try:
        tensors = load(raw)
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        config, info = json.loads(meta.get("config", "null")), json.loads(meta.get("info", "{}"))
    except (SafetensorError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable method state (corrupt or truncated: {e})") from e
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a few-shot method state (format={meta.get('format')!r})")
    if meta.get("method") != method.name:
        raise ValueError(f"{path} holds the state of method {meta.get('method')!r}, not {method.name!r}")
    want = json.loads(json.dumps(method.config(), sort_keys=True, default=str))
    if config != want:
        if isinstance(config, dict):
            keys = sorted(set(config) | set(want))
            diff = {k: (config.get(k), want.get(k)) for k in keys if config.get(k) != want.get(k)}
            detail = "; ".join(f"{k}: saved {a!r}, asked {b!r}" for k, (a, b) in diff.items())
        else:
            detail = f"saved {config!r}, asked {want!r}"
        raise ValueError(f"{path} was trained with other settings ({detail}); retrain without --reuse")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise FloatingPointError(f"{path}: state tensor {k!r} holds NaN or infinite values; retrain {method.name}")
    method.load_state_dict(tensors)
    return info
