"""Permutation alignment of a whole zoo to one reference: weight matching and activation matching.

Builds the task's full zoo with :func:`metaflow_ws.train.train_population` (breast_cancer: 100 runs × 50 kept
checkpoints = 5,000 networks), aligns every checkpoint to checkpoint 0 with both methods and prints seconds and
networks per second (goal: well under a minute each on 2 CPU cores). Checks on the way that alignment preserved
every network's function. Usage:

    python benchmarks/bench_align.py [--task breast_cancer] [--runs 100] [--epochs E] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metaflow_ws.symmetry import activation_matching, weight_matching
from metaflow_ws.tasks import get_task
from metaflow_ws.train import train_population


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="breast_cancer")
    ap.add_argument("--runs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    task = get_task(args.task)
    spec = task.spec

    t0 = time.perf_counter()
    zoo = train_population(task, args.runs, epochs=args.epochs, seed=args.seed)
    zoo_seconds = time.perf_counter() - t0
    n = len(zoo)
    ref = spec.state_dict_of(zoo.params, 0)
    probe = task.data(int(zoo.seeds.get("data_seed", 0))).x_train
    x_check = task.data(int(zoo.seeds.get("data_seed", 0))).x_test
    before = spec.batched_forward(zoo.params, x_check)

    # warm-up on a few networks (scipy import, allocator)
    weight_matching(spec, {k: v[:4] for k, v in zoo.params.items()}, ref)
    activation_matching(spec, {k: v[:4] for k, v in zoo.params.items()}, ref, probe)

    results: dict[str, object] = {"task": task.name, "networks": n, "architecture": spec.describe(),
                                  "zoo_seconds": round(zoo_seconds, 2), "threads": torch.get_num_threads()}
    for method in ("weight", "activation"):
        t0 = time.perf_counter()
        if method == "weight":
            res = weight_matching(spec, zoo.params, ref, generator=torch.Generator().manual_seed(args.seed))
        else:
            res = activation_matching(spec, zoo.params, ref, probe)
        sec = time.perf_counter() - t0
        err = float((spec.batched_forward(res.params, x_check) - before).abs().max())
        moved = sum(float((p != torch.arange(p.shape[1])).any(1).float().mean()) for p in res.perms) / len(res.perms)
        results[method] = {"seconds": round(sec, 3), "networks_per_s": round(n / sec, 1), "sweeps": res.iterations,
                           "converged": float(res.converged.float().mean()), "max_output_change": err,
                           "fraction_permuted": round(moved, 3)}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{task.name}: {n} networks ({spec.describe()}), zoo built in {zoo_seconds:.1f}s, "
          f"{results['threads']} threads")
    for method in ("weight", "activation"):
        r = results[method]
        assert isinstance(r, dict)
        print(f"  {method:<10} matching: {r['seconds']:7.2f}s  {r['networks_per_s']:9.1f} networks/s  "
              f"sweeps={r['sweeps']} converged={r['converged']:.3f} max |Δoutput|={r['max_output_change']:.2e}")


if __name__ == "__main__":
    main()
