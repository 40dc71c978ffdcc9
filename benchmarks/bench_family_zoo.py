"""How the few-shot flow method's family zoo is made decides what the flow can learn: recipes side by side.

For each zoo recipe (shared initialisation × optimizer) it builds the sinusoid family zoo exactly as
``metaflow-ws fewshot --methods flow`` does (:meth:`FlowMethod.family_zoo`, 2,000 meta-training tasks) and asks
two questions of the finished networks, with no flow involved:

* **Smooth in the task?** For each of 600 held-out test tasks, average the weights of the zoo networks of the
  k nearest meta-training tasks (by amplitude and phase) and score the averaged network on the test task's
  100 query points. A flow regresses weights on a task embedding; where averaging neighbours breaks the
  function (k = 2 much worse than k = 1), the map from task to weights is not smooth and the flow's output
  lands between incompatible solutions.
* **Stable under the protocol's fine-tuning?** Fine-tune the nearest-task network 1 and 10 full-batch SGD
  steps (lr 0.01) on the test task's K = 5 support points, as the protocol fine-tunes the flow's proposals.

Usage::

    python benchmarks/bench_family_zoo.py [--tasks 2000] [--init-iterations 2000]
        [--recipes random/adam maml/adam maml/sgd] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from metaflow_ws.fewshot.baselines import MetaConfig
from metaflow_ws.fewshot.conditional import FlowMethod, FlowMethodConfig
from metaflow_ws.fewshot.episodes import get_family, stream_generator
from metaflow_ws.fewshot.protocol import per_task_loss, sgd_adapt

#: recipe name → FlowMethodConfig overrides; "maml/sgd" is the method's default
RECIPES = {
    "random/adam": {"zoo_init": "random", "net_optimizer": "adam", "net_lr": 1e-2, "net_batch": 25, "net_epochs": 300},
    "maml/adam": {"zoo_init": "maml", "net_optimizer": "adam", "net_lr": 1e-3, "net_batch": 25, "net_epochs": 300},
    "maml/sgd": {},
}


def _mean_median(v: torch.Tensor) -> str:
    v = v.double()
    return f"{v.mean().item():.3g} / {v.median().item():.3g}" if torch.isfinite(v).all() else \
        f"diverged ({int((~torch.isfinite(v)).sum())}) / {v.median().item():.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000, help="meta-training tasks in each zoo")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--init-iterations", type=int, default=FlowMethodConfig.zoo_init_iterations,
                    help="MAML iterations of the meta-learned shared init")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    fam = get_family("sinusoid")
    spec = fam.spec
    tests = fam.test_set([5, 10])
    scale = torch.tensor([fam.amplitude_range[1] - fam.amplitude_range[0], fam.phase_range[1] - fam.phase_range[0]])
    rows = []
    for name in args.recipes:
        settings = FlowMethodConfig(tasks=args.tasks, keep=1, zoo_init_iterations=args.init_iterations,
                                    **RECIPES[name])
        method = FlowMethod(fam, MetaConfig(inner_lr=fam.lr), settings=settings, seed=args.seed)
        t0 = time.perf_counter()
        zoo, _, info = method.family_zoo(stream_generator(args.seed, "train"))
        seconds = time.perf_counter() - t0
        weights = zoo.flat()
        params = torch.stack([zoo.metrics["task_param_0"], zoo.metrics["task_param_1"]], 1).float()
        near = torch.cdist(tests[10].task_params / scale, params / scale).topk(8, largest=False).indices
        init = spec.flatten(method.shared_init)
        row = {"recipe": name, "zoo_seconds": round(seconds, 1), "moved": (weights - init).norm(dim=1).mean().item(),
               "train_loss_median": info["zoo_train_loss_median"]}
        for k in (1, 2, 8):
            avg = spec.unflatten(weights[near[:, :k]].mean(1))
            row[f"avg{k}_mse"] = per_task_loss(spec, "regression", avg, tests[10].query_x, tests[10].query_y)
        nearest = spec.unflatten(weights[near[:, 0]])
        t5 = tests[5]
        for steps in (1, 10):
            tuned = sgd_adapt(spec, "regression", nearest, t5.support_x, t5.support_y, steps=steps, lr=fam.lr)
            row[f"ft{steps}_mse"] = per_task_loss(spec, "regression", tuned, t5.query_x, t5.query_y)
        rows.append(row)
    if args.json:
        print(json.dumps([{k: (_mean_median(v) if torch.is_tensor(v) else v) for k, v in r.items()} for r in rows]))
        return
    print(f"sinusoid family zoos, {args.tasks} meta-training tasks; query MSE on 600 test tasks, mean / median")
    print(f"{'recipe':<12} {'zoo s':>6} {'|w-init|':>9} {'avg 1 nearest':>15} {'avg 2 nearest':>15} "
          f"{'avg 8 nearest':>15} {'K=5, 1 SGD step':>18} {'K=5, 10 SGD steps':>24}")
    for r in rows:
        print(f"{r['recipe']:<12} {r['zoo_seconds']:>6.0f} {r['moved']:>9.2f} {_mean_median(r['avg1_mse']):>15} "
              f"{_mean_median(r['avg2_mse']):>15} {_mean_median(r['avg8_mse']):>15} "
              f"{_mean_median(r['ft1_mse']):>18} {_mean_median(r['ft10_mse']):>24}")
    base = rows[0]
    for r in rows[1:]:
        print(f"{r['recipe']} vs {base['recipe']}: averaging 2 nearest tasks' weights "
              f"{base['avg2_mse'].mean() / r['avg2_mse'].mean():.1f}x lower query MSE")


if __name__ == "__main__":
    main()
