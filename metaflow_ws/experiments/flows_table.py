"""Zoo → flows → samples → evaluation: the comparison behind ``make demo`` and ``results/<task>/``."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from metaflow_ws.evaluation.metrics import evaluate_zoo
from metaflow_ws.flows import (FLOWS, FlowConfig, SampleConfig, TrainConfig, default_prior_std, sample,
                               task_flow_defaults, train_flow)
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.tasks.registry import Task, get_task

__all__ = ["FlowRun", "compare_flows", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class FlowRun:
    """One row of the comparison: a flow variant and how it is trained and sampled."""

    flow: str
    coupling: str = "independent"
    align: bool = True

    @property
    def label(self) -> str:
        parts = [self.flow.capitalize()]
        parts.append("aligned" if self.align else "unaligned")
        if self.coupling != "independent":
            parts.append({"ot": "OT", "perm": "perm", "ot-perm": "OT+perm"}[self.coupling])
        return f"{parts[0]} ({'+'.join(parts[1:])})"


def compare_flows(
    zoo: Zoo,
    task: Task | str | None = None,
    runs: Sequence[FlowRun] = tuple(FlowRun(f, coupling="ot-perm") for f in FLOWS),
    *,
    train: TrainConfig | None = None,
    d_model: int | None = None,
    num_layers: int | None = None,
    samples: int = 100,
    sampler: SampleConfig = SampleConfig(),  # noqa: B008 - frozen
    seed: int = 0,
    out_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train every flow variant in ``runs`` on ``zoo``, draw ``samples`` networks from each and evaluate them on
    the task's test split next to the zoo's own final checkpoints. Returns one dict per row.

    ``d_model``, ``num_layers`` and (when ``train`` is not given) the learning rate default to the task's flow
    (:func:`~metaflow_ws.flows.task_flow_defaults`: its task file's ``[flow]`` table, else the library defaults),
    as ``metaflow-ws compare`` does; a given ``train`` config is used as it is.
    """
    task = get_task(task or zoo.task)
    defaults = task_flow_defaults(task.name)
    d_model = defaults["d_model"] if d_model is None else d_model
    num_layers = defaults["num_layers"] if num_layers is None else num_layers
    train = TrainConfig(lr=defaults["lr"]) if train is None else train
    log = log or (lambda s: None)
    rows: list[dict[str, Any]] = []
    target = evaluate_zoo(task, zoo.final(), device=device)
    rows.append({"method": f"Target ({zoo.recipe.get('optimizer', '?')}-trained, final checkpoints)",
                 **_metrics(target), "n": target["n"]})
    prior = default_prior_std(zoo)
    for run in runs:
        cfg = FlowConfig(flow=run.flow, widths=zoo.spec.widths, activation=zoo.spec.activation, task=task.name,
                         prior_std=prior, d_model=d_model, num_layers=num_layers)
        tc = dataclasses.replace(train, coupling=run.coupling, align=run.align, seed=seed)
        folder = Path(out_dir) / f"{run.flow}_{run.coupling}_{'aligned' if run.align else 'unaligned'}" if out_dir else None
        log(f"  training {run.label}: {tc.steps} steps ...")
        res = train_flow(zoo, cfg, tc, folder, device=device)
        t0 = time.perf_counter()
        x = sample(res.flow, samples, sampler, generator=torch.Generator().manual_seed(seed))
        t_sample = time.perf_counter() - t0
        params = res.flow.decode(x)
        s_zoo = Zoo.from_params(task.name, zoo.spec, {k: v.detach().cpu() for k, v in params.items()},
                                seeds={"seed": seed, "data_seed": zoo.data_seed},  # the zoo's split
                                info={"source": "flow", "flow": run.label})
        if folder is not None:
            s_zoo.save(folder / "samples.safetensors")
        ev = evaluate_zoo(task, s_zoo, device=device)
        rows.append({"method": run.label, **_metrics(ev), "n": samples,
                     "train_seconds": round(res.seconds, 1), "steps_per_second": round(res.steps_per_second, 1),
                     "sample_seconds": round(t_sample, 2), "flow_params": sum(p.numel() for p in res.flow.field.parameters()),
                     "final_loss": res.final_loss})
        log(f"    {run.label}: acc {ev.get('accuracy_mean', float('nan')):.4f} ± {ev.get('accuracy_std', 0):.4f}, "
            f"nll {ev.get('nll_mean', float('nan')):.4f} ({res.seconds:.0f}s train, {t_sample:.1f}s sampling)")
    return rows


def _metrics(ev: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ev.items() if k.endswith(("_mean", "_std"))}


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`compare_flows` as a markdown table (mean ± std)."""
    keys = [k[:-5] for k in rows[0] if k.endswith("_mean")]
    head = ["method", *[f"test {k}" for k in keys], "n", "train s", "steps/s", "sampling s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"]] + [f"{r[k + '_mean']:.4f} ± {r[k + '_std']:.4f}" for k in keys]
        cells += [str(r.get("n", "")), str(r.get("train_seconds", "–")), str(r.get("steps_per_second", "–")),
                  str(r.get("sample_seconds", "–"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
