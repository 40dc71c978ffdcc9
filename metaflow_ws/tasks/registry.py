"""Declarative task registry.

A *task family* is a TOML file in the top-level ``tasks/`` folder (shipped as ``metaflow_ws.builtin_tasks``), in
any folder listed in ``METAFLOW_WS_TASKS`` (``os.pathsep``-separated), or registered from Python with
:func:`register_task`. A file has the tables ``[dataset]`` (``builder`` plus its arguments), ``[architecture]``
(``widths``, ``activation``) and ``[recipe]`` (the population-training recipe), and optionally ``[flow]`` (the
default weight-space flow for the task's zoos: field size and learning rate) and ``[synthetic]`` for weight
families that are drawn rather than trained. Unknown keys are rejected.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from metaflow_ws.nets.spec import NetworkSpec
from metaflow_ws.tasks.datasets import BUILDERS, TaskData

__all__ = [
    "FlowRecipe",
    "Recipe",
    "Synthetic",
    "Task",
    "TaskFileError",
    "UnknownTaskError",
    "get_task",
    "list_tasks",
    "load_task_file",
    "register_task",
    "task_from_dict",
]


class UnknownTaskError(KeyError):
    """A task name that is not registered. The message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its argument; show the message as written
        return str(self.args[0])


class TaskFileError(ValueError):
    """A task file or dict that does not follow the schema."""


@dataclass(frozen=True)
class Recipe:
    """How the networks of a zoo are trained (or drawn, for ``optimizer = "sample"``).

    Checkpoints: after the first ``skip_epochs`` epochs every ``keep_every``-th optimizer step is kept, counted
    back from the final step so that the final weights are always a checkpoint.
    """

    optimizer: Literal["sgd", "adam", "sample"] = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    nesterov: bool = False
    batch_size: int = 32
    epochs: int = 10
    init: Literal["normal", "kaiming_uniform"] = "normal"
    init_std: float = 0.1
    skip_epochs: int = 0
    keep_every: int = 1
    runs: int = 10

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam", "sample"):
            raise TaskFileError(f"recipe.optimizer must be 'sgd', 'adam' or 'sample'; got {self.optimizer!r}")
        if self.init not in ("normal", "kaiming_uniform"):
            raise TaskFileError(f"recipe.init must be 'normal' or 'kaiming_uniform'; got {self.init!r}")
        for k in ("batch_size", "epochs", "keep_every", "runs"):
            if int(getattr(self, k)) < 1:
                raise TaskFileError(f"recipe.{k} must be ≥ 1; got {getattr(self, k)}")
        if not 0 <= self.skip_epochs < max(self.epochs, 1) and self.optimizer != "sample":
            raise TaskFileError(f"recipe.skip_epochs must lie in [0, epochs); got {self.skip_epochs}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))


@dataclass(frozen=True)
class FlowRecipe:
    """The default weight-space flow for a task's zoos: what ``metaflow-ws train`` and ``report`` use where no flag
    says otherwise. None keeps the library's default (:class:`~metaflow_ws.flows.FlowConfig`,
    :class:`~metaflow_ws.flows.TrainConfig`); :func:`metaflow_ws.flows.task_flow_defaults` fills them in."""

    #: width of the Relational Transformer (``train --d-model``)
    d_model: int | None = None
    #: its number of layers (``train --layers``)
    num_layers: int | None = None
    #: peak AdamW learning rate (``train --lr``)
    lr: float | None = None

    def __post_init__(self) -> None:
        for k in ("d_model", "num_layers"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TaskFileError(f"flow.{k} must be an integer ≥ 1; got {v!r}")
        if self.lr is not None:
            if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < float("inf"):
                raise TaskFileError(f"flow.lr must be a positive number; got {self.lr!r}")
            object.__setattr__(self, "lr", float(self.lr))


@dataclass(frozen=True)
class Synthetic:
    """A weight family drawn from a Gaussian instead of trained (thesis §4.1): target N(mean, std²)."""

    target_mean: float = 1.0
    target_std: float = 1.0
    prior_std: float = 1.0


@dataclass(frozen=True)
class Task:
    """A family of target networks: dataset, architecture, training recipe."""

    name: str
    spec: NetworkSpec
    kind: Literal["classification", "regression", "synthetic"]
    builder: str
    dataset_args: Mapping[str, Any] = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)
    flow: FlowRecipe = field(default_factory=FlowRecipe)
    synthetic: Synthetic | None = None
    description: str = ""
    source: str = "python"

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "regression", "synthetic"):
            raise TaskFileError(f"task {self.name!r}: kind must be classification, regression or synthetic; got {self.kind!r}")
        if self.builder not in BUILDERS:
            raise TaskFileError(f"task {self.name!r}: unknown dataset builder {self.builder!r}; known: {sorted(BUILDERS)}")
        if self.kind == "synthetic" and self.synthetic is None:
            raise TaskFileError(f"task {self.name!r}: a synthetic task needs a [synthetic] table")
        object.__setattr__(self, "dataset_args", dict(self.dataset_args))

    def __hash__(self) -> int:
        return hash((self.name, self.spec, json.dumps(self.dataset_args, sort_keys=True, default=str)))

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    def data(self, seed: int = 0, device: torch.device | str | None = None) -> TaskData:
        """Deterministic train/val/test splits for ``seed`` (cached per task, seed)."""
        d = _load_data(self.builder, json.dumps(self.dataset_args, sort_keys=True), int(seed))
        return d.to(device) if device is not None else d

    def variant(self, **dataset_args: Any) -> Task:
        """A member of the family with some dataset arguments changed, e.g. ``sinusoid.variant(amplitude=2.0)``
        or ``digits_permuted.variant(permutation_seed=3)``."""
        args = {**self.dataset_args, **dataset_args}
        suffix = ",".join(f"{k}={v}" for k, v in sorted(dataset_args.items()))
        return dataclasses.replace(self, dataset_args=args, name=f"{self.name}[{suffix}]" if suffix else self.name)

    def with_widths(self, widths: Sequence[int]) -> Task:
        """This task (data, recipe, activation) with networks of other hidden layers, named e.g.
        ``breast_cancer[30-16-16-16-2]``: the target of architecture transfer and its trained reference.
        ``widths`` must keep the task's input and output sizes; the task itself when they equal its own."""
        widths = tuple(int(w) for w in widths)
        if widths == self.spec.widths:
            return self
        n_in, n_out = self.spec.in_features, self.spec.out_features
        if len(widths) < 2 or (widths[0], widths[-1]) != (n_in, n_out) or min(widths) < 1:
            raise ValueError(f"task {self.name!r} has {n_in} inputs and {n_out} outputs ({self.spec.describe()}); "
                             f"widths {'-'.join(map(str, widths))} must be positive, start with {n_in} and end "
                             f"with {n_out}")
        return dataclasses.replace(self, spec=NetworkSpec(widths, self.spec.activation),
                                   name=f"{self.name}[{'-'.join(map(str, widths))}]")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "dataset": {"builder": self.builder, **self.dataset_args},
            "architecture": self.spec.to_dict(),
            "recipe": dataclasses.asdict(self.recipe),
            **({"flow": fl} if (fl := {k: v for k, v in dataclasses.asdict(self.flow).items() if v is not None})
               else {}),
            **({"synthetic": dataclasses.asdict(self.synthetic)} if self.synthetic else {}),
        }

    def summary(self, with_sizes: bool = True) -> dict:
        """Name, architecture and (where the data is available) split sizes, for ``metaflow-ws tasks``."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "architecture": self.spec.describe(),
            "params": self.spec.num_params,
            "optimizer": self.recipe.optimizer,
            "runs": self.recipe.runs,
            "epochs": self.recipe.epochs,
            "source": self.source,
        }
        if with_sizes:
            try:
                out["sizes"] = self.data(0).sizes()
            except FileNotFoundError as e:
                out["sizes"] = None
                out["unavailable"] = str(e).split(". ")[0]
        return out


@functools.lru_cache(maxsize=64)
def _load_data(builder: str, args_json: str, seed: int) -> TaskData:
    return BUILDERS[builder](seed=seed, **json.loads(args_json))


# ------------------------------------------------------------------------------------------------ parsing
def _only(table: Mapping, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TaskFileError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def task_from_dict(d: Mapping[str, Any], source: str = "python") -> Task:
    """Build a :class:`Task` from the TOML schema (as a dict); unknown keys raise :class:`TaskFileError`."""
    where = f"task {d.get('name', '?')!r} ({source})"
    _only(d, {"name", "description", "kind", "dataset", "architecture", "recipe", "flow", "synthetic"}, where)
    for req in ("name", "kind", "dataset", "architecture"):
        if req not in d:
            raise TaskFileError(f"{where}: missing required key {req!r}")
    ds = dict(d["dataset"])
    if "builder" not in ds:
        raise TaskFileError(f"{where}: [dataset] needs a 'builder' (one of {sorted(BUILDERS)})")
    builder = ds.pop("builder")
    arch = dict(d["architecture"])
    _only(arch, {"widths", "activation"}, f"{where} [architecture]")
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    rec = dict(d.get("recipe", {}))
    _only(rec, recipe_fields, f"{where} [recipe]")
    if not isinstance(d.get("flow", {}), Mapping):
        raise TaskFileError(f"{where}: [flow] must be a table (d_model, num_layers, lr); got {d['flow']!r}")
    flow = dict(d.get("flow", {}))
    _only(flow, {f.name for f in dataclasses.fields(FlowRecipe)}, f"{where} [flow]")
    syn = d.get("synthetic")
    if syn is not None:
        _only(syn, {f.name for f in dataclasses.fields(Synthetic)}, f"{where} [synthetic]")
    try:
        spec = NetworkSpec(tuple(arch["widths"]), arch.get("activation", "relu"))
        if "betas" in rec:
            rec["betas"] = tuple(rec["betas"])
        return Task(
            name=str(d["name"]),
            spec=spec,
            kind=d["kind"],
            builder=builder,
            dataset_args=ds,
            recipe=Recipe(**rec),
            flow=FlowRecipe(**flow),
            synthetic=Synthetic(**syn) if syn is not None else None,
            description=str(d.get("description", "")),
            source=source,
        )
    except TaskFileError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise TaskFileError(f"{where}: {e}") from e


def load_task_file(path: str | os.PathLike) -> Task:
    """Parse one task TOML file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            d = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise TaskFileError(f"{path}: invalid TOML: {e}") from e
    return task_from_dict(d, source=str(path))


# ----------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Task] = {}
_LOADED = False


def _builtin_dir() -> Path:
    local = Path(__file__).resolve().parents[2] / "tasks"  # source checkout / editable install
    if local.is_dir():
        return local
    from importlib.resources import files

    return Path(str(files("metaflow_ws.builtin_tasks")))


def _ensure_loaded() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    dirs = [_builtin_dir()] + [Path(p) for p in os.environ.get("METAFLOW_WS_TASKS", "").split(os.pathsep) if p]
    for folder in dirs:
        for path in sorted(folder.glob("*.toml")):
            task = load_task_file(path)
            _REGISTRY.setdefault(task.name, task)


def register_task(task: Task | Mapping[str, Any] | str | os.PathLike, *, overwrite: bool = False) -> Task:
    """Register a :class:`Task`, a dict in the task-file schema, or the path of a TOML file."""
    _ensure_loaded()
    if isinstance(task, (str, os.PathLike)):
        task = load_task_file(task)
    elif not isinstance(task, Task):
        task = task_from_dict(task)
    if task.name in _REGISTRY and not overwrite:
        raise ValueError(f"task {task.name!r} is already registered (from {_REGISTRY[task.name].source}); "
                         "pass overwrite=True to replace it")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str | Task, **dataset_args: Any) -> Task:
    """The registered task ``name`` (optionally a family member via :meth:`Task.variant`)."""
    if isinstance(name, Task):
        return name.variant(**dataset_args) if dataset_args else name
    _ensure_loaded()
    try:
        task = _REGISTRY[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(_REGISTRY))}") from None
    return task.variant(**dataset_args) if dataset_args else task


def list_tasks() -> list[Task]:
    _ensure_loaded()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
