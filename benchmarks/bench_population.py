"""Population training: vmapped functional Adam over R networks vs a Python loop of torch.optim models.

Both sides run the same recipe (the task's), the same per-run inits and data orders, in one process, so the
printed ratio is measured side by side. Usage:

    python benchmarks/bench_population.py [--task breast_cancer] [--runs 100] [--epochs E]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from metaflow_ws.tasks import get_task
from metaflow_ws.train import train_population
from metaflow_ws.train.reference import train_with_torch_optim


def loop_of_torch_optim(task, runs: int, epochs: int, seed: int = 0) -> float:
    t0 = time.perf_counter()
    train_with_torch_optim(task, runs, epochs=epochs, seed=seed)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="breast_cancer")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    task = get_task(args.task)
    epochs = args.epochs or task.recipe.epochs
    train_population(task, 2, epochs=1)  # warm-up (imports, allocator)

    t0 = time.perf_counter()
    zoo = train_population(task, args.runs, epochs=epochs, evaluate=False)
    t_vmap = time.perf_counter() - t0
    t0 = time.perf_counter()
    zoo = train_population(task, args.runs, epochs=epochs)  # with metrics of every checkpoint, as `metaflow-ws zoo`
    t_full = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_loop = loop_of_torch_optim(task, args.runs, epochs)
    res = {
        "task": task.name,
        "runs": args.runs,
        "epochs": epochs,
        "threads": torch.get_num_threads(),
        "vmap_seconds": round(t_vmap, 3),
        "loop_seconds": round(t_loop, 3),
        "speedup": round(t_loop / t_vmap, 1),
        "vmap_with_metrics_seconds": round(t_full, 3),
        "checkpoints": len(zoo),
        "peak_rss_mb_after_vmap_run": round(peak_mb, 1),
        "test_accuracy_mean": round(zoo.summary()["test_accuracy_mean"], 4),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"population training, {task.name}: {args.runs} runs x {epochs} epochs ({torch.get_num_threads()} threads)")
        print(f"  vmap + functional {task.recipe.optimizer}: {t_vmap:8.2f} s  (training only, like the loop)")
        print(f"  loop of torch.optim   : {t_loop:8.2f} s")
        print(f"  speedup               : {t_loop / t_vmap:8.1f}x   (goal >= 20x)")
        print(f"  vmap run + metrics of all {len(zoo)} checkpoints (what `metaflow-ws zoo` does): {t_full:.2f} s "
              f"({t_loop / t_full:.1f}x)")
        print(f"  peak RSS after the vmapped run: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
