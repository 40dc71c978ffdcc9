"""``metaflow-ws zoo``: train a population of target networks with vmap and write a zoo file."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common, parse_widths

NAME = "zoo"
HELP = "train R networks of a task at once (vmap) and save the checkpoints as a zoo"
ORDER = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="registered task name (see `metaflow-ws tasks`)")
    p.add_argument("--runs", type=int, default=None, help="number of networks (default: the recipe's)")
    p.add_argument("--out", required=True, help="output zoo file (.safetensors)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--data-dir", default=None, help="folder with MNIST-like IDX files (mnist, fashion_mnist)")
    p.add_argument("--widths", type=parse_widths, default=None, metavar="W",
                   help="train networks of other hidden layers than the task's, e.g. 30-16-16-16-2 (same inputs and "
                        "outputs; the reference for architecture transfer, `sample --widths`)")
    p.add_argument("--family", type=int, default=None, metavar="T",
                   help="family zoo: train on T member tasks of the family (sinusoid: task_seed 0..T-1; "
                        "digits_permuted: permutation_seed), --runs networks per task, one shared init")
    p.add_argument("--first-member", type=int, default=0, help="first member index of a family zoo")
    p.add_argument("--independent-init", action="store_true",
                   help="family zoo: every network gets its own init instead of one shared init")
    add_common(p)


def task_from_args(args: argparse.Namespace):
    from metaflow_ws.tasks import get_task

    task = get_task(args.task)
    if getattr(args, "data_dir", None):
        if task.builder not in ("mnist", "fashion_mnist"):
            raise ValueError(f"--data-dir only applies to mnist/fashion_mnist tasks, not {task.name!r}")
        task = task.variant(root=args.data_dir)
    if getattr(args, "widths", None):
        task = task.with_widths(args.widths)
    return task


def run(args: argparse.Namespace) -> int:
    import time

    from metaflow_ws.cli import print_json
    from metaflow_ws.commands import progress_bar
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.train import train_population

    task = task_from_args(args)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    bar, update = progress_bar(0, f"zoo {task.name}")
    try:
        def progress(step: int, total: int, loss: float) -> None:
            bar.total = total
            update(step, total, loss)

        if args.family is not None:
            from metaflow_ws.train.family import train_family

            zoo = train_family(task, args.family, 1 if args.runs is None else args.runs, epochs=args.epochs,
                               first_member=args.first_member, shared_init=not args.independent_init,
                               seed=args.seed, data_seed=args.data_seed, device=device, progress=progress)
        else:
            zoo = train_population(task, args.runs, epochs=args.epochs, seed=args.seed, data_seed=args.data_seed,
                                   device=device, progress=progress)
    finally:
        bar.close()
    zoo.save(args.out)
    summary = zoo.summary() | {"seconds": round(time.perf_counter() - t0, 3), "out": str(args.out),
                               "device": str(device)}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {summary['runs']} runs, {summary['checkpoints']} checkpoints, "
              f"{summary['params']} params each, {summary['seconds']:.1f}s")
        for split in ("train", "val", "test"):
            for m in ("accuracy", "loss", "mse"):
                k = f"{split}_{m}"
                if f"{k}_mean" in summary:
                    print(f"  final {k:<15} {summary[k + '_mean']:.4f} ± {summary[k + '_std']:.4f}")
    return 0
