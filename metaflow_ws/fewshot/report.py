"""What ``metaflow-ws fewshot`` writes: the results file, its README table and a plot of sinusoid fits.

``results.json`` holds one entry per family (``{"families": {name: entry}}``); a run replaces its family's
entry and keeps the others, and ``README.md`` is regenerated from the whole file, so the sinusoid and the digits
runs share one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from metaflow_ws.io.atomic import atomic_write_json, atomic_write_text
from metaflow_ws.nets.spec import Params

__all__ = ["format_cell", "markdown_family", "plot_sinusoid_fits", "readme_text", "update_results"]

#: Numbers measured for MAML in exactly this protocol, quoted by issue 7 (K: {steps: (mean, ci95)}).
SINUSOID_MAML_ANCHOR = {5: {1: (0.66, 0.06), 10: (0.33, 0.04)}, 10: {1: (0.38, 0.04), 10: (0.11, 0.01)}}


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (no lock file left behind)."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def update_results(out: str | os.PathLike, family: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Replace the entry ``family`` (a family name or a run label) in ``out/results.json`` and rewrite
    ``out/README.md`` (atomic writes, under a lock)."""
    out = Path(out)
    with _locked(out):
        path = out / "results.json"
        results: dict[str, Any] = {"families": {}}
        if path.is_file():
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); move it away to start a new results file") from e
            if not isinstance(results.get("families"), dict):
                raise ValueError(f"{path} is not a few-shot results file (no 'families' table)")
        results["families"][family] = json.loads(json.dumps(entry, default=str))
        atomic_write_json(path, results)
        atomic_write_text(out / "README.md", readme_text(results))
    return results


def format_cell(r: Mapping[str, Any] | None, metric: str) -> str:
    if r is None:
        return "–"
    if r.get("nonfinite"):
        return f"diverged ({r['nonfinite']} tasks)"
    digits = 3 if metric == "accuracy" or r["mean"] < 10 else 1
    return f"{r['mean']:.{digits}f} ± {r['ci95']:.{digits}f}"


def markdown_family(entry: Mapping[str, Any]) -> str:
    """One family's section: settings, the exact command, the table method × K × steps, training times."""
    steps = entry["steps"]
    metric = entry["metric"]
    cfg = entry["config"]
    label = entry.get("label", entry["family"])
    lines = [f"## {label}: {entry['title']}", ""]
    lines += [f"Written by `{entry['command']}` ({entry['date']}, device {entry['device']}, torch "
              f"{entry['torch']}, {entry['threads']} thread(s)); the whole command took {entry['seconds']:.0f} s.", ""]
    lines += [f"- Test set: {entry['num_tasks']} held-out tasks from the `test` seed stream of test seed "
              f"{entry['test_seed']}; {entry['protocol']}.",
              f"- Protocol: best of {entry['candidates']} candidate(s) on the support loss, then "
              f"{', '.join(map(str, steps))} steps of full-batch SGD at lr {entry['lr']} on the support set "
              "(Meta-SGD: its learned step sizes; ANIL: head only); "
              f"{'query MSE, lower is better' if metric == 'mse' else 'query accuracy, higher is better'}; "
              "mean ± 1.96·std/√T.",
              f"- Budget of every meta-trained method: {cfg['iterations']} meta-iterations, meta-batch "
              f"{cfg['meta_batch']}, {cfg['inner_steps']} inner SGD step(s) at lr {cfg['inner_lr']} (Reptile: "
              f"{cfg['reptile_steps']} steps on support ∪ query), Adam lr {cfg['outer_lr']}; meta-training episodes "
              f"with {entry['train_shots']} support and {entry['train_query']} query points"
              f"{' per class' if metric == 'accuracy' else ''}; training seed {entry['seed']} "
              f"(`train` / `init` seed streams).",
              f"- Architecture: {entry['architecture']}.", ""]
    if not entry.get("complete", True):
        done = list(entry["methods"])
        todo = [m for m in entry.get("planned_methods", []) if m not in done]
        lines += [f"**Incomplete:** the command has not finished (or failed); still to run: {', '.join(todo)}.", ""]
    if entry.get("method_options"):
        opts = "; ".join(f"{m}: " + ", ".join(f"`{k}={v}`" for k, v in o.items())
                         for m, o in entry["method_options"].items())
        lines += [f"**Method options** (changed from the defaults): {opts}.", ""]
    if entry.get("budget_note"):
        lines += [f"**Budget note:** {entry['budget_note']}", ""]
    # results.json is written with sorted keys: restore the run's method order and numeric K order
    planned = list(entry.get("planned_methods") or [])
    builtin = ["maml", "fomaml", "anil", "metasgd", "reptile", "pretrain", "scratch"]
    rank = {n: i for i, n in enumerate(planned or builtin)}
    methods = sorted(entry["methods"].items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    rows = [(name, k, {r["steps"]: r for r in res["results"]})
            for name, m in methods for k, res in sorted(m["results"].items(), key=lambda kv: int(kv[0]))]

    def table(cell: Callable[[Mapping[str, Any] | None], str]) -> list[str]:
        head = "| method | K | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |"
        return [head, "|---|---|" + "---|" * len(steps),
                *(f"| {name} | {k} | " + " | ".join(cell(by.get(s)) for s in steps) + " |" for name, k, by in rows)]

    lines += table(lambda r: format_cell(r, metric))
    if metric == "mse" and any("median" in r for _, _, by in rows for r in by.values()):
        lines += ["", "Median over the test tasks (where it is far below the mean, a few tasks dominate the "
                  "mean):", ""]
        lines += table(lambda r: "–" if r is None or r.get("median") is None else f"{r['median']:.3f}")
    lines += ["", "| method | meta-training wall time | final meta-loss | state |", "|---|---|---|---|"]
    for name, m in methods:
        t = m["train"]
        secs = t.get("seconds", 0.0)
        loss = t.get("final_meta_loss")
        reused = " (reused)" if t.get("reused") else ""
        lines.append(f"| {name} | {secs:.0f} s{reused} | {'–' if loss is None else f'{loss:.4f}'} | "
                     f"{m.get('state') or '–'} |")
    lines += ["", "Final meta-loss: mean over the last logging window of the query loss after the inner loop "
              "(Reptile: after adapting on support ∪ query, so it is a training loss; pretrain: the pooled loss of "
              "the single network). A cell reads *diverged* when fine-tuning made some tasks' query loss "
              "non-finite; a huge finite mean has the same cause on fewer tasks."]
    if entry["family"] == "sinusoid":
        a = SINUSOID_MAML_ANCHOR
        lines += ["", "Anchor (issue 7, MAML in this protocol, 20k iterations): K=5 "
                  f"{a[5][1][0]} ± {a[5][1][1]} after 1 step, {a[5][10][0]} ± {a[5][10][1]} after 10; K=10 "
                  f"{a[10][1][0]} ± {a[10][1][1]} / {a[10][10][0]} ± {a[10][10][1]}."]
    if entry.get("plot"):
        lines += ["", f"![sinusoid fits]({entry['plot']})", "",
                  f"Fits on the first test tasks (K = {entry['plot_shots']}): true curve, support points, and the "
                  f"networks of {', '.join(entry['plot_methods'])} after {', '.join(map(str, steps))} steps."]
    return "\n".join(lines) + "\n"


def readme_text(results: Mapping[str, Any]) -> str:
    fams = results["families"]
    parts = ["# Few-shot transfer: MAML-family baselines (and any registered method) in one protocol", "",
             "Written by `metaflow-ws fewshot`; the numbers below come from `results.json` in this folder. Saved "
             "meta-trained states live in `state/<family>/<method>.safetensors` (re-score them without "
             "retraining with `--reuse`).", ""]
    for name in sorted(fams):
        parts.append(markdown_family(fams[name]))
    return "\n".join(parts)


def plot_sinusoid_fits(path: str | os.PathLike, family: Any, task_params: torch.Tensor, support_x: torch.Tensor,
                       support_y: torch.Tensor, kept: Mapping[str, Mapping[int, Params]],
                       steps: Sequence[int]) -> Path:
    """A grid of sinusoid fits: one column per task, one row per method; each panel shows the true curve, the
    support points and the method's network after each number of adaptation steps.

    ``task_params: [n, 2]``, ``support_x / support_y: [n, K, 1]``, ``kept: {method: {steps: {name: [n, ...]}}}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metaflow_ws.io.atomic import atomic_write_bytes

    n = task_params.shape[0]
    methods = list(kept)
    grid = torch.linspace(float(family.x_range[0]), float(family.x_range[1]), 200).reshape(1, -1, 1)
    true = family.function(task_params.to(torch.float64), grid.to(torch.float64).expand(n, -1, -1))
    fig, axes = plt.subplots(len(methods), n, figsize=(3.2 * n, 2.6 * len(methods)), squeeze=False, sharex=True)
    colors = plt.get_cmap("viridis")([i / max(len(steps) - 1, 1) for i in range(len(steps))])
    for row, m in enumerate(methods):
        for col in range(n):
            ax = axes[row][col]
            ax.plot(grid[0, :, 0], true[col, :, 0], color="black", lw=1.5, label="true")
            for c, s in zip(colors, steps):
                if s not in kept[m]:
                    continue
                p = {k: v[col : col + 1].to(torch.float32).cpu() for k, v in kept[m][s].items()}
                with torch.no_grad():
                    pred = family.spec.batched_forward(p, grid[0])[0, :, 0]
                ax.plot(grid[0, :, 0], pred, color=c, lw=1.2, ls="--", label=f"{s} step{'s' if s != 1 else ''}")
            ax.scatter(support_x[col, :, 0].cpu(), support_y[col, :, 0].cpu(), color="red", s=18, zorder=5,
                       label="support")
            if col == 0:
                ax.set_ylabel(m)
            if row == 0:
                ax.set_title(f"A={float(task_params[col, 0]):.2f}, φ={float(task_params[col, 1]):.2f}", fontsize=9)
            ax.set_ylim(-5.5, 5.5)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
