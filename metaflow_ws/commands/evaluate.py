"""``metaflow-ws evaluate``: metrics of every network in a zoo-format file on a task's test split."""

from __future__ import annotations

import argparse
import sys

from metaflow_ws.commands import add_common

NAME = "evaluate"
HELP = "evaluate the networks of a zoo-format file (zoo or flow samples) on a task"
ORDER = 60


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task whose data to evaluate on")
    p.add_argument("--weights", required=True, help="zoo-format .safetensors file")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--final", action="store_true", help="only the final checkpoint of every run")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the train/val/test split (default: the split the file's networks were trained on, "
                        "as recorded by `zoo` and `sample`; 0 if the file records none)")
    p.add_argument("--data-dir", default=None, help="folder with MNIST-like IDX files (mnist, fashion_mnist)")
    add_common(p, seed=False)


def run(args: argparse.Namespace) -> int:
    from metaflow_ws.cli import print_json
    from metaflow_ws.commands.zoo import task_from_args
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.evaluation import evaluate_zoo
    from metaflow_ws.io import Zoo

    task = task_from_args(args)
    device = resolve_device(args.device)
    zoo = Zoo.load(args.weights)
    if args.final:
        zoo = zoo.final()
    if zoo.spec != task.spec and zoo.spec.activation == task.spec.activation:
        try:  # networks of other hidden layers (architecture transfer) are scored on the task's data as they are
            task = task.with_widths(zoo.spec.widths)
        except ValueError:
            pass  # other input/output sizes: evaluate_zoo names both architectures
    if args.data_seed is not None and args.data_seed != zoo.data_seed and "data_seed" in zoo.seeds:
        print(f"warning: {args.weights} was trained on split {zoo.data_seed} (data seed); scoring it on split "
              f"{args.data_seed} puts some of its training points in the {args.split} set. Leave out --data-seed "
              "to use the networks' own split.", file=sys.stderr)
    res = evaluate_zoo(task, zoo, split=args.split, data_seed=args.data_seed, device=device)
    if args.json:
        print_json(res)
    else:
        print(f"{args.weights} on {task.name} ({args.split}, n={res['n']}):")
        for k, v in res.items():
            if k.endswith("_mean"):
                base = k[: -len("_mean")]
                print(f"  {base:<10} {v:.4f} ± {res[base + '_std']:.4f}")
    return 0
