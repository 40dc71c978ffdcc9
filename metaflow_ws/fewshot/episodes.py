"""Few-shot episodes: batched, seeded samplers of meta-training and meta-test tasks.

An *episode batch* (:class:`Episodes`) holds T tasks, each with a support set and a query set, as stacked
tensors; targets are always floats ``[T, n, out]`` (one-hot rows for classification), so the same vmapped loss
and the same set encoder serve every family.

Seed streams. Every random draw of the few-shot code comes from a ``torch.Generator`` seeded by
:func:`stream_seed` ``(seed, stream)`` = ``STREAM_BASE + 4·seed + offset(stream)`` with the offsets
``train 0, test 1, propose 2, init 3``. A stream's seeds are therefore one residue class mod 4: no meta-training
seed is ever a meta-test seed, whatever ``--seed`` the user picks. The meta-test set is drawn from the ``test``
stream of a *fixed* ``test_seed`` (0 by default), independent of the training seed, so every method and every
run is scored on the same tasks.

Families:

- :class:`SinusoidFamily` — the MAML benchmark ``y = A sin(x − φ)``, ``A ~ U[0.1, 5]``, ``φ ~ U[0, π]``,
  ``x ~ U[−5, 5]`` (ranges and the 1-40-40-1 ReLU network from ``tasks/sinusoid.toml``).
- :class:`DigitsFewShot` — N-way K-shot episodes over held-out classes of scikit-learn's 8×8 digits (the
  ``digits`` task, its train/val/test splits pooled): meta-train classes 0–4, meta-test classes 5–9, labels
  permuted at random in every episode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec

__all__ = [
    "FAMILIES",
    "STREAMS",
    "DigitsFewShot",
    "Episodes",
    "Family",
    "SinusoidFamily",
    "get_family",
    "register_family",
    "stream_generator",
    "stream_seed",
]

#: Offsets of the seed streams (a stream is one residue class mod 4).
STREAMS: dict[str, int] = {"train": 0, "test": 1, "propose": 2, "init": 3}
STREAM_BASE = 0x5EED_0000


def stream_seed(seed: int, stream: str) -> int:
    """Seed of ``stream`` (``train``, ``test``, ``propose``, ``init``) for base seed ``seed`` (≥ 0)."""
    if stream not in STREAMS:
        raise ValueError(f"unknown seed stream {stream!r}; expected one of {sorted(STREAMS)}")
    if int(seed) < 0:
        raise ValueError(f"seeds must be ≥ 0; got {seed}")
    return STREAM_BASE + 4 * int(seed) + STREAMS[stream]


def stream_generator(seed: int, stream: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stream_seed` (draws are made on CPU, then moved)."""
    return torch.Generator().manual_seed(stream_seed(seed, stream))


# ------------------------------------------------------------------------------------------------ episodes
@dataclass(frozen=True)
class Episodes:
    """T few-shot tasks.

    ``support_x: [T, S, in]``, ``support_y: [T, S, out]``, ``query_x: [T, Q, in]``, ``query_y: [T, Q, out]``
    (float targets; one-hot rows for classification), ``task_params: [T, P]`` (sinusoid: amplitude, phase;
    digits: the original digit of each label 0..N−1), ``kind``: ``"regression"`` or ``"classification"``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    task_params: Tensor
    kind: str
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"episode kind must be 'regression' or 'classification'; got {self.kind!r}")
        names = ("support_x", "support_y", "query_x", "query_y")
        for n in names:
            t = getattr(self, n)
            if t.dim() != 3:
                raise ValueError(f"{n} must be a (T, n, features) tensor; got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"{n} must be floating point (one-hot targets for classification); got {t.dtype}")
        t = self.support_x.shape[0]
        if any(getattr(self, n).shape[0] != t for n in names) or self.task_params.shape[0] != t:
            raise ValueError("all episode tensors must hold the same number of tasks T; got "
                             + ", ".join(f"{n} {tuple(getattr(self, n).shape)}" for n in (*names, "task_params")))
        if self.support_x.shape[1] != self.support_y.shape[1] or self.query_x.shape[1] != self.query_y.shape[1]:
            raise ValueError(f"x and y must hold the same number of points: support {tuple(self.support_x.shape)} vs "
                             f"{tuple(self.support_y.shape)}, query {tuple(self.query_x.shape)} vs "
                             f"{tuple(self.query_y.shape)}")
        if self.support_x.shape[2] != self.query_x.shape[2] or self.support_y.shape[2] != self.query_y.shape[2]:
            raise ValueError("support and query must have the same feature sizes")

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    @property
    def support_size(self) -> int:
        return self.support_x.shape[1]

    @property
    def query_size(self) -> int:
        return self.query_x.shape[1]

    def to(self, device: torch.device | str) -> Episodes:
        return replace(self, **{n: getattr(self, n).to(device) for n in
                                ("support_x", "support_y", "query_x", "query_y", "task_params")})

    def index(self, idx: Tensor | slice | Sequence[int]) -> Episodes:
        """A subset of the tasks."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx, dtype=torch.long, device=self.support_x.device)
        return replace(self, **{n: getattr(self, n)[idx] for n in
                                ("support_x", "support_y", "query_x", "query_y", "task_params")})

    def pooled(self) -> tuple[Tensor, Tensor]:
        """Support and query concatenated per task: ``[T, S + Q, in]``, ``[T, S + Q, out]``."""
        return torch.cat([self.support_x, self.query_x], 1), torch.cat([self.support_y, self.query_y], 1)


# ------------------------------------------------------------------------------------------------ families
class Family(Protocol):
    """A distribution over few-shot tasks and the target network that solves them.

    ``sample`` draws meta-training episodes from a generator of the ``train`` stream; ``test_set`` draws the fixed
    meta-test episodes, one :class:`Episodes` per support size, sharing tasks and query sets across sizes.
    A family may also carry ``method_defaults: Mapping[str, Mapping[str, Any]]``, the settings it picks for a
    method (``{"flow": {"zoo_init": "random"}}``); explicit ``--method-option`` values override them.
    """

    name: str
    kind: str
    spec: NetworkSpec
    #: default support size (per class for classification) and query size of meta-training episodes
    train_shots: int
    train_query: int
    #: default support sizes and query size of the meta-test set
    test_shots: tuple[int, ...]
    test_query: int
    #: default SGD learning rate of the inner loop and of test-time fine-tuning
    lr: float

    def sample(self, n_tasks: int, shots: int, n_query: int, generator: torch.Generator) -> Episodes: ...

    def test_set(self, shots: Sequence[int], n_tasks: int = 600, n_query: int | None = None,
                 seed: int = 0) -> dict[int, Episodes]: ...

    def describe(self) -> dict[str, Any]: ...


def _check_counts(n_tasks: int, shots: Sequence[int], n_query: int) -> None:
    if int(n_tasks) < 1:
        raise ValueError(f"the number of tasks must be ≥ 1; got {n_tasks}")
    if not shots or any(int(k) < 1 for k in shots):
        raise ValueError(f"support sizes must be ≥ 1; got {list(shots)}")
    if int(n_query) < 1:
        raise ValueError(f"the number of query points must be ≥ 1; got {n_query}")


def _uniform(lo_hi: Sequence[float], size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return lo + (hi - lo) * torch.rand(size, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class SinusoidFamily:
    """``y = A sin(x − φ)`` with ``A ~ U[amplitude_range]``, ``φ ~ U[phase_range]``, ``x ~ U[x_range]``.

    Draws are made in float64 on the CPU (then cast to float32) so episodes do not depend on the device.
    """

    amplitude_range: tuple[float, float] = (0.1, 5.0)
    phase_range: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    spec: NetworkSpec = NetworkSpec((1, 40, 40, 1), "relu")
    name: str = "sinusoid"
    kind: str = "regression"
    train_shots: int = 10
    train_query: int = 10
    test_shots: tuple[int, ...] = (5, 10, 20)
    test_query: int = 100
    lr: float = 0.01

    @classmethod
    def from_task(cls, task: str = "sinusoid", **overrides: Any) -> SinusoidFamily:
        """The family described by a registered sinusoid task file (ranges and architecture)."""
        from metaflow_ws.tasks import get_task

        t = get_task(task)
        if t.builder != "sinusoid" or t.kind != "regression":
            raise ValueError(f"task {t.name!r} is not a sinusoid regression family (builder {t.builder!r})")
        a = t.dataset_args
        kw: dict[str, Any] = {"spec": t.spec, "name": t.name}
        for key in ("amplitude_range", "phase_range", "x_range"):
            if key in a:
                kw[key] = tuple(float(v) for v in a[key])
        kw.update(overrides)
        return cls(**kw)

    def sample_tasks(self, n_tasks: int, generator: torch.Generator) -> Tensor:
        """Task parameters ``[T, 2]`` (amplitude, phase), float64."""
        amp = _uniform(self.amplitude_range, (n_tasks,), generator)
        phase = _uniform(self.phase_range, (n_tasks,), generator)
        return torch.stack([amp, phase], 1)

    def function(self, task_params: Tensor, x: Tensor) -> Tensor:
        """True targets: ``task_params [T, 2]``, ``x [T, n, 1]`` → ``[T, n, 1]``."""
        amp, phase = task_params[:, 0, None, None], task_params[:, 1, None, None]
        return amp * torch.sin(x - phase)

    def _episodes(self, params: Tensor, sx: Tensor, qx: Tensor, info: dict) -> Episodes:
        f = lambda v: v.to(torch.float32)  # noqa: E731
        return Episodes(f(sx), f(self.function(params, sx)), f(qx), f(self.function(params, qx)), f(params),
                        self.kind, info)

    def sample(self, n_tasks: int, shots: int, n_query: int, generator: torch.Generator) -> Episodes:
        """``n_tasks`` fresh tasks with ``shots`` support and ``n_query`` query points each.

        Draw order: task parameters, support inputs, query inputs."""
        _check_counts(n_tasks, [shots], n_query)
        params = self.sample_tasks(n_tasks, generator)
        sx = _uniform(self.x_range, (n_tasks, shots, 1), generator)
        qx = _uniform(self.x_range, (n_tasks, n_query, 1), generator)
        return self._episodes(params, sx, qx, {"shots": shots})

    def test_set(self, shots: Sequence[int], n_tasks: int = 600, n_query: int | None = None,
                 seed: int = 0) -> dict[int, Episodes]:
        """The meta-test set: ``n_tasks`` tasks from the ``test`` stream of ``seed``.

        Draw order: task parameters, ``n_query`` query inputs per task, then support inputs one point at a time
        for all tasks. So the tasks and query sets do not depend on ``shots``, and the K-shot support set is the
        first K points of any larger one (nested support sets; ``--shots 5`` and ``--shots 5 10 20`` give the same
        5-shot tasks)."""
        n_query = self.test_query if n_query is None else n_query
        _check_counts(n_tasks, shots, n_query)
        g = stream_generator(seed, "test")
        params = self.sample_tasks(n_tasks, g)
        qx = _uniform(self.x_range, (n_tasks, n_query, 1), g)
        sx = torch.stack([_uniform(self.x_range, (n_tasks, 1), g) for _ in range(max(shots))], 1)
        return {int(k): self._episodes(params, sx[:, :k], qx, {"shots": int(k), "test_seed": seed})
                for k in shots}

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "kind": self.kind, "architecture": self.spec.describe(),
                "amplitude_range": list(self.amplitude_range), "phase_range": list(self.phase_range),
                "x_range": list(self.x_range)}


@dataclass(frozen=True)
class DigitsFewShot:
    """N-way K-shot episodes over held-out classes of the ``digits`` task (sklearn 8×8 digits, 64 inputs).

    The digits of the task's train/val/test splits (``data_seed``) are pooled; meta-training episodes use
    ``train_classes``, meta-test episodes ``test_classes``. Each episode picks ``n_way`` of the split's classes
    in random order (label i = the i-th picked class, so labels are permuted in every episode) and, per class,
    ``shots`` support and ``n_query`` query examples without replacement. Support sets are ordered by label.
    """

    n_way: int = 5
    train_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    test_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    hidden: tuple[int, ...] = (32,)
    task: str = "digits"
    data_seed: int = 0
    name: str = "digits"
    kind: str = "classification"
    train_shots: int = 5
    train_query: int = 15
    test_shots: tuple[int, ...] = (1, 5)
    test_query: int = 15
    #: MAML's Omniglot step size: at 0.01, ten SGD steps leave a fresh 64-32-5 network at chance (22 %)
    lr: float = 0.4
    #: The flow method's family zoo starts from a random shared init here, not a MAML one: meta-learners fitted
    #: to the 5 meta-training classes fine-tune worse on held-out classes than a fresh network does (MAML 0.573
    #: vs scratch 0.804 after 10 steps, 5-shot), and the flow built on the MAML init inherited that (0.661; from
    #: the random init 0.765, and 0.26 instead of chance with no step). ``results/fewshot`` has both runs.
    method_defaults: ClassVar[dict[str, dict[str, Any]]] = {"flow": {"zoo_init": "random"}}

    def __post_init__(self) -> None:
        if self.n_way < 2:
            raise ValueError(f"n_way must be ≥ 2; got {self.n_way}")
        overlap = set(self.train_classes) & set(self.test_classes)
        if overlap:
            raise ValueError(f"meta-train and meta-test classes must be disjoint; both hold {sorted(overlap)}")
        for split, cls in (("train", self.train_classes), ("test", self.test_classes)):
            if len(set(cls)) < self.n_way:
                raise ValueError(f"{self.n_way}-way episodes need ≥ {self.n_way} {split} classes; got {list(cls)}")

    @property
    def spec(self) -> NetworkSpec:
        return NetworkSpec((64, *self.hidden, self.n_way), "relu")

    @cached_property
    def _pool(self) -> tuple[Tensor, Tensor]:
        from metaflow_ws.tasks import get_task

        t = get_task(self.task)
        if t.kind != "classification":
            raise ValueError(f"task {t.name!r} is not a classification task")
        d = t.data(self.data_seed)
        x = torch.cat([d.x_train, d.x_val, d.x_test]).to(torch.float32)
        y = torch.cat([d.y_train, d.y_val, d.y_test]).to(torch.int64)
        if x.shape[1] != 64:
            raise ValueError(f"task {t.name!r} has {x.shape[1]} inputs; DigitsFewShot expects 64")
        return x, y

    def _table(self, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Example indices per class, padded with −1: ``[C, M]`` and counts ``[C]``."""
        _, y = self._pool
        rows = [torch.nonzero(y == c).flatten() for c in classes]
        counts = torch.tensor([len(r) for r in rows])
        if (counts == 0).any():
            missing = [c for c, n in zip(classes, counts.tolist()) if n == 0]
            raise ValueError(f"task {self.task!r} has no examples of classes {missing}")
        table = torch.full((len(rows), int(counts.max())), -1, dtype=torch.long)
        for i, r in enumerate(rows):
            table[i, : len(r)] = r
        return table, counts

    def _episodes(self, classes: Sequence[int], n_tasks: int, shots: Sequence[int], n_query: int,
                  generator: torch.Generator, info: dict) -> dict[int, Episodes]:
        _check_counts(n_tasks, shots, n_query)
        x_pool, _ = self._pool
        table, counts = self._table(classes)
        k_max, n = max(shots), self.n_way
        need = k_max + n_query
        if int(counts.min()) < need:
            raise ValueError(f"{k_max}-shot episodes with {n_query} query points per class need {need} examples "
                             f"of every class; the smallest of classes {list(classes)} has {int(counts.min())}")
        cls_pos = torch.rand(n_tasks, len(classes), generator=generator).argsort(1)[:, :n]     # [T, N]
        r = torch.rand(n_tasks, n, table.shape[1], generator=generator)
        r = r.masked_fill(torch.arange(table.shape[1]) >= counts[cls_pos].unsqueeze(-1), 2.0)  # padding sorts last
        pos = r.argsort(-1)[..., :need]                                                         # [T, N, need]
        idx = table[cls_pos.unsqueeze(-1), pos]               # example indices: n_query query, then k_max support
        onehot = torch.eye(n)
        digits = torch.as_tensor(classes)[cls_pos].to(torch.float32)
        qi = idx[..., :n_query].reshape(n_tasks, n * n_query)
        qy = onehot.repeat_interleave(n_query, 0).expand(n_tasks, -1, -1)
        out = {}
        for k in shots:
            si = idx[..., n_query : n_query + k].reshape(n_tasks, n * k)
            sy = onehot.repeat_interleave(k, 0).expand(n_tasks, -1, -1)
            out[int(k)] = Episodes(x_pool[si], sy.contiguous(), x_pool[qi], qy.contiguous(), digits, self.kind,
                                   {**info, "shots": int(k), "n_way": n})
        return out

    def sample(self, n_tasks: int, shots: int, n_query: int, generator: torch.Generator) -> Episodes:
        """Meta-training episodes: ``n_way``-way, ``shots`` support and ``n_query`` query examples per class."""
        return self._episodes(self.train_classes, n_tasks, [shots], n_query, generator, {})[int(shots)]

    def test_set(self, shots: Sequence[int], n_tasks: int = 600, n_query: int | None = None,
                 seed: int = 0) -> dict[int, Episodes]:
        """Meta-test episodes over ``test_classes`` from the ``test`` stream of ``seed``. Each class's examples are
        ranked by one random key per example; the first ``n_query`` are the query set and the next K the K-shot
        support, so episodes and query sets do not depend on ``shots`` and support sets are nested."""
        n_query = self.test_query if n_query is None else n_query
        return self._episodes(self.test_classes, n_tasks, list(shots), n_query, stream_generator(seed, "test"),
                              {"test_seed": seed})

    def describe(self) -> dict[str, Any]:
        return {"family": self.name, "kind": self.kind, "architecture": self.spec.describe(), "n_way": self.n_way,
                "train_classes": list(self.train_classes), "test_classes": list(self.test_classes),
                "task": self.task, "data_seed": self.data_seed}


# ------------------------------------------------------------------------------------------------ registry
FAMILIES: dict[str, Callable[..., Family]] = {
    "sinusoid": SinusoidFamily.from_task,
    "digits": DigitsFewShot,
}


def register_family(name: str, factory: Callable[..., Family], *, overwrite: bool = False) -> None:
    """Make a few-shot family available to :func:`get_family` and ``metaflow-ws fewshot --family``."""
    if name in FAMILIES and not overwrite:
        raise ValueError(f"few-shot family {name!r} is already registered; pass overwrite=True to replace it")
    FAMILIES[name] = factory


def get_family(name: str, **kwargs: Any) -> Family:
    """The few-shot family ``name``; raises ``ValueError`` listing the registered names for an unknown one."""
    try:
        factory = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown few-shot family {name!r}; expected one of {sorted(FAMILIES)}") from None
    return factory(**kwargs)
