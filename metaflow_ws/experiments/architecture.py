"""Architecture transfer of a saved flow: other hidden widths and depths of its task, with and without guidance.

``metaflow-ws transfer`` measures architecture transfer on its digits source flow (64-10-10), which has one
hidden layer and so can only change widths. This experiment takes any flow folder (``metaflow-ws train``,
``report``'s ``OUT/flows/*``) and runs the same section, :func:`~metaflow_ws.experiments.transfer.architecture_transfer`,
on the architectures you name: for each, samples unguided, guided (normalized task-loss gradient at x_t and at the
flow's prediction x̂1) and by guidance alone from the same prior draws, next to networks trained at that
architecture with the task's recipe. A flow trained on networks with two or more hidden layers (``breast_cancer``'s
30-16-16-2) also samples other depths: its interior layers' embeddings serve every interior layer of a deeper
network (:func:`~metaflow_ws.models.relational_transformer.layer_map`).

Run it with ``python -m metaflow_ws.experiments.architecture --flow results/breast_cancer/flows/geometric_ot-perm_aligned_3000
--widths 30-16-2 30-16-16-16-2 30-32-32-2 --out results/breast_cancer_architecture``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from metaflow_ws.experiments.transfer import (TransferConfig, architecture_plot, architecture_table,
                                              architecture_transfer, growth_findings)
from metaflow_ws.flows import WeightFlow
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from metaflow_ws.tasks.registry import Task, get_task

__all__ = ["main", "markdown", "run_architecture", "source_task"]


def source_task(flow: WeightFlow, name: str | None = None) -> Task:
    """The task ``flow`` was trained on (``name`` overrides what the flow records), at the flow's architecture.

    A recorded name such as ``mnist1d[40-10-10]`` (a task at other widths) resolves to the registered task
    ``mnist1d`` at those widths; a dataset variant (``digits_permuted[permutation_seed=1]``) needs ``name``."""
    if name is not None:
        return get_task(name).with_widths(flow.spec.widths)
    recorded = flow.meta.get("zoo_task") or flow.config.task
    if not recorded:
        raise ValueError("the flow records no task; pass --task TASK (the task its zoo was trained on)")
    task = get_task(recorded.split("[", 1)[0]).with_widths(flow.spec.widths)
    if "[" in recorded and task.name != recorded:
        raise ValueError(f"the flow was trained on {recorded!r}, a variant this experiment cannot rebuild from its "
                         "name; pass --task with the registered task to sample for")
    return task


def run_architecture(flow: WeightFlow, task: Task, cfg: TransferConfig, *, device: torch.device | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`architecture_transfer` of ``flow`` on ``task`` for ``cfg.arch_widths`` (plus the flow's own)."""
    device = device or torch.device("cpu")
    t0 = time.perf_counter()
    at = architecture_transfer(task, flow.to(device), cfg, device, log)
    return {"architecture_transfer": at, "candidates": cfg.candidates, "seed": cfg.seed,
            "target_runs": cfg.target_runs, "target_epochs": cfg.target_epochs, "flow": flow.config.to_dict(),
            "flow_meta": {k: v for k, v in flow.meta.items() if k in ("zoo_task", "zoo_checkpoints", "seconds")},
            "seconds": round(time.perf_counter() - t0, 1), "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def markdown(res: dict[str, Any], command: str) -> str:
    at, f = res["architecture_transfer"], res["flow"]
    noise = f.get("sigma", 0.0)
    lines = [f"# Architecture transfer: the {f['flow']} flow of `{at['source']}` on other architectures", "",
             f"Written by `{command}` in {res['seconds']:.0f} s on {res['device']} ({res['threads']} thread(s), "
             f"torch {res['torch']}), seed {res['seed']}. Flow: {f['flow']}, RT d={f['d_model']} × "
             f"{f['num_layers']}, path noise σ = {noise:g}, trained on {res['flow_meta'].get('zoo_checkpoints', '?')} "
             f"checkpoints of `{res['flow_meta'].get('zoo_task', at['source'])}`. Accuracies on the test split, mean ± std "
             f"over networks; *best of {res['candidates']}*: the lowest-training-loss sample in each group of "
             f"{res['candidates']}. *Guidance only*: the same prior draws and guidance steps with the flow's velocity "
             f"switched off. Trained: {res['target_runs']} networks per architecture, the task's recipe.", "",
             *architecture_table(at, res["candidates"]), ""]
    rows = [r for r in at["rows"] if r["transferred"]]
    if rows:
        lines += ["## Findings (computed from the table)", ""]
        for r in rows:
            best = max((n for n in r if n.startswith("guided")), key=lambda n: r[n]["accuracy_mean"], default=None)
            tr = r["trained"]["accuracy_mean"]
            parts = [f"unguided {r['unguided']['accuracy_mean']:.3f}"]
            if best is not None:
                g = r[best]["accuracy_mean"]
                parts.append(f"best guided ({best}) {g:.3f} = {g / tr:.1%} of trained {tr:.3f}")
                if "guidance only" in r:
                    go = r["guidance only"]["accuracy_mean"]
                    parts.append(f"the flow {'adds to' if g > go else 'does not beat'} guidance alone ({go:.3f})")
            lines.append(f"- {r['architecture']}: " + "; ".join(parts) + ".")
        lines += [f"- {g}" for g in growth_findings(at)] + [""]
    lines += ["## Reproduce", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from metaflow_ws.commands import parse_widths

    p = argparse.ArgumentParser(prog="python -m metaflow_ws.experiments.architecture",
                                description="architecture transfer of a saved flow: other widths and depths, "
                                            "with and without guidance, next to networks trained there")
    p.add_argument("--flow", required=True, help="flow folder (metaflow-ws train, or report's OUT/flows/NAME)")
    p.add_argument("--widths", type=parse_widths, nargs="+", required=True, metavar="W",
                   help="architectures to sample, e.g. 30-16-2 30-16-16-16-2 (same inputs and outputs)")
    p.add_argument("--out", required=True, help="folder for README.md, results.json and the plot")
    p.add_argument("--task", default=None, help="task the flow was trained on (default: what the flow records)")
    p.add_argument("-n", "--samples", type=int, default=32, help="samples per population")
    p.add_argument("--steps", type=int, default=128, help="integration steps")
    p.add_argument("--guidance", type=float, default=10.0, help="normalized guidance strength λ")
    p.add_argument("--candidates", type=int, default=8, help="best of k on the training loss")
    p.add_argument("--trained-runs", type=int, default=10, help="networks trained per architecture")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = p.parse_args(argv)
    from metaflow_ws.errors import resolve_device

    try:
        device = resolve_device(args.device)
        flow = WeightFlow.from_pretrained(args.flow)
        task = source_task(flow, args.task)
        flow.check_spec(task.spec, what=f"task {task.name!r}")
        for w in args.widths:
            flow.for_spec(task.with_widths(w).spec)  # every architecture is checked before any work
        cfg = TransferConfig(arch_widths=tuple(tuple(w) for w in args.widths), arch_steps=args.steps,
                             arch_guidance=args.guidance, samples=args.samples, candidates=args.candidates,
                             target_runs=args.trained_runs, seed=args.seed)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run_architecture(flow, task, cfg, device=device, log=lambda s: print(s, file=sys.stderr, flush=True))
    command = "python -m metaflow_ws.experiments.architecture " + shlex.join(
        sys.argv[1:] if argv is None else list(argv))
    out = Path(args.out)
    res = {**res, "command": command}
    atomic_write_bytes(out / "architecture_transfer.png", architecture_plot(res["architecture_transfer"]))
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "README.md", markdown(res, command))
    print(f"wrote {out / 'README.md'}, {out / 'results.json'} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
