"""The zoo file: a population of networks of one architecture, as safetensors plus JSON metadata.

Tensors: ``params.<name>`` stacked ``[C, ...]`` per parameter (C checkpoints), ``run_id`` and ``step`` ``[C]``
(int64) and any per-checkpoint metrics ``metric.<name>`` ``[C]`` (float32). Metadata (safetensors string map):
``format``, ``version``, ``task``, ``spec`` (JSON), ``recipe``, ``seeds``, ``task_args`` and ``info`` (JSON).
Flow samples use the same format (``run_id`` = sample index, ``step`` = 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaflow_ws.io.atomic import atomic_write_bytes
from metaflow_ws.nets.spec import MLP, NetworkSpec, Params

__all__ = ["FORMAT", "Zoo", "ZooFormatError"]

FORMAT = "metaflow_ws.zoo"
VERSION = "1"


class ZooFormatError(ValueError):
    """A zoo file that is corrupt, truncated, of another format, or of the wrong architecture."""


@dataclass
class Zoo:
    """C networks of one architecture with per-checkpoint bookkeeping.

    ``params``: ``{name: [C, ...]}``; ``run_id``/``step``: ``[C]`` int64; ``metrics``: ``{name: [C]}``.
    """

    task: str
    spec: NetworkSpec
    params: Params
    run_id: Tensor
    step: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    task_args: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        c = self.spec.batch_size(self.params)
        for name, t in {"run_id": self.run_id, "step": self.step, **self.metrics}.items():
            if t.shape != (c,):
                raise ValueError(f"zoo field {name!r} must have shape ({c},) to match {c} networks; got {tuple(t.shape)}")

    # ----------------------------------------------------------------------------------------- views
    def __len__(self) -> int:
        return self.run_id.shape[0]

    @property
    def num_runs(self) -> int:
        return int(torch.unique(self.run_id).numel())

    @property
    def data_seed(self) -> int:
        """Seed of the train/val/test split the networks were trained on (``seeds["data_seed"]``; 0 if unknown):
        score them on this split's test set, whose points they never saw."""
        return int(self.seeds.get("data_seed", 0))

    def flat(self) -> Tensor:
        """``[C, D]`` flat weights."""
        return self.spec.flatten(self.params)

    @classmethod
    def from_params(cls, task: str, spec: NetworkSpec, params: Params, **kw: Any) -> Zoo:
        """A zoo of independent networks (e.g. flow samples): ``run_id`` = index, ``step`` = 0 unless given."""
        c = spec.batch_size(params)
        kw.setdefault("run_id", torch.arange(c))
        kw.setdefault("step", torch.zeros(c, dtype=torch.int64))
        return cls(task=task, spec=spec, params=dict(params), **kw)

    @classmethod
    def from_flat(cls, task: str, spec: NetworkSpec, flat: Tensor, **kw: Any) -> Zoo:
        """:meth:`from_params` from flat ``[C, D]`` weights."""
        return cls.from_params(task, spec, spec.unflatten(flat), **kw)

    def select(self, index: Tensor | slice) -> Zoo:
        """A zoo of the chosen checkpoints (boolean mask or index tensor)."""
        return Zoo(
            task=self.task,
            spec=self.spec,
            params={k: v[index] for k, v in self.params.items()},
            run_id=self.run_id[index],
            step=self.step[index],
            metrics={k: v[index] for k, v in self.metrics.items()},
            recipe=self.recipe,
            seeds=self.seeds,
            task_args=self.task_args,
            info=self.info,
        )

    def final(self) -> Zoo:
        """The last checkpoint (largest step) of every run, ordered by run id."""
        runs = torch.unique(self.run_id)
        idx = []
        for r in runs.tolist():
            where = torch.nonzero(self.run_id == r).flatten()
            idx.append(where[torch.argmax(self.step[where])])
        return self.select(torch.stack(idx))

    def modules(self) -> list[MLP]:
        """Every checkpoint as a :class:`~metaflow_ws.nets.MLP`."""
        return self.spec.to_modules(self.params)

    def module(self, index: int) -> MLP:
        m = self.spec.module()
        m.load_state_dict(self.spec.state_dict_of(self.params, index))
        return m

    def to(self, device: torch.device | str) -> Zoo:
        z = self.select(slice(None))
        z.params = {k: v.to(device) for k, v in z.params.items()}
        return z

    # -------------------------------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors."""
        from safetensors.torch import save

        tensors = {f"params.{k}": v.detach().to("cpu").contiguous() for k, v in self.params.items()}
        tensors["run_id"] = self.run_id.to("cpu", torch.int64).contiguous()
        tensors["step"] = self.step.to("cpu", torch.int64).contiguous()
        for k, v in self.metrics.items():
            tensors[f"metric.{k}"] = v.detach().to("cpu", torch.float32).contiguous()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "task": self.task,
            "spec": json.dumps(self.spec.to_dict()),
            "recipe": json.dumps(self.recipe, default=str),
            "seeds": json.dumps(self.seeds),
            "task_args": json.dumps(self.task_args, default=str),
            "info": json.dumps(self.info, default=str),
        }
        return atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        spec: NetworkSpec | None = None,
        device: torch.device | str | None = None,
    ) -> Zoo:
        """Read and validate a zoo file. ``spec``, when given, must match the file's architecture."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"zoo file {path} does not exist; create one with `metaflow-ws zoo TASK --out {path}`")
        raw = path.read_bytes()
        try:
            tensors = load(raw)
            meta = _read_metadata(raw)
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise ZooFormatError(
                f"{path} is not a readable safetensors file (corrupt or truncated: {e}); re-create it with "
                "`metaflow-ws zoo`"
            ) from e
        if meta.get("format") != FORMAT:
            raise ZooFormatError(f"{path} is a safetensors file but not a metaflow_ws zoo (format={meta.get('format')!r})")
        try:
            file_spec = NetworkSpec.from_dict(json.loads(meta["spec"]))
            extra = {k: json.loads(meta.get(k, "{}")) for k in ("recipe", "seeds", "task_args", "info")}
        except (KeyError, ValueError) as e:
            raise ZooFormatError(f"{path}: metadata is damaged ({e})") from e
        if spec is not None and spec != file_spec:
            raise ZooFormatError(
                f"{path} holds {file_spec.describe()} networks but {spec.describe()} was expected"
            )
        params = {k[len("params."):]: v for k, v in tensors.items() if k.startswith("params.")}
        for key in ("run_id", "step"):
            if key not in tensors:
                raise ZooFormatError(f"{path}: missing tensor {key!r}")
        try:
            file_spec.check(params)
            zoo = cls(
                task=meta.get("task", "?"),
                spec=file_spec,
                params=params,
                run_id=tensors["run_id"],
                step=tensors["step"],
                metrics={k[len("metric."):]: v for k, v in tensors.items() if k.startswith("metric.")},
                **extra,
            )
        except ValueError as e:
            raise ZooFormatError(f"{path}: {e}") from e
        for k, v in zoo.params.items():
            if not torch.isfinite(v).all():
                raise ZooFormatError(f"{path}: parameter {k!r} contains NaN or infinite values")
        return zoo.to(device) if device is not None else zoo

    def summary(self) -> dict[str, Any]:
        """Counts and mean ± std of each metric over the final checkpoint of every run."""
        fin = self.final()
        out: dict[str, Any] = {"task": self.task, "runs": self.num_runs, "checkpoints": len(self),
                               "params": self.spec.num_params, "architecture": self.spec.describe()}
        if "task_id" in self.metrics:  # family zoo: task ids and parameters are bookkeeping, not metrics
            out["tasks"] = int(torch.unique(self.metrics["task_id"]).numel())
        for k, v in fin.metrics.items():
            if k == "task_id" or k.startswith("task."):
                continue
            out[f"{k}_mean"] = float(v.mean())
            out[f"{k}_std"] = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
        return out


def _read_metadata(raw: bytes) -> dict[str, str]:
    if len(raw) < 8:
        raise ValueError("file shorter than the 8-byte header length")
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__", {})
    if not isinstance(meta, Mapping):
        raise ValueError("metadata is not a string map")
    return dict(meta)
