"""``metaflow-ws barrier``: loss barriers between final networks of a zoo, before or after permutation alignment."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common

NAME = "barrier"
HELP = "loss barriers along linear paths between pairs of final networks of a zoo (optionally aligned)"
DESCRIPTION = (
    "Interpolate linearly between random pairs of final checkpoints of distinct runs and report the midpoint "
    "barrier L(mid) - (L(a)+L(b))/2 and the max barrier over a grid of alphas on the task's data. With --align the "
    "second network of each pair (--align-to pair) or every final network (--align-to reference: to the first "
    "run's) is permutation-aligned first, which removes most of the barrier."
)
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", required=True, help="zoo file (.safetensors) written by `metaflow-ws zoo`")
    p.add_argument("--task", default=None, help="task whose data to use (default: the zoo's task)")
    p.add_argument("--align", action="store_true", help="permutation-align the networks before interpolating")
    p.add_argument("--method", default="weight", choices=["weight", "activation"],
                   help="alignment objective: weight matching (Git Re-Basin) or activation matching")
    p.add_argument("--align-to", default="pair", choices=["pair", "reference"],
                   help="align the second network of each pair to the first, or every network to run 0's")
    p.add_argument("--pairs", type=int, default=None, help="number of random pairs (default: min(100, all pairs))")
    p.add_argument("--grid", type=int, default=11, help="number of alphas in [0, 1] for the max barrier")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data-seed", type=int, default=None, help="split seed (default: the zoo's)")
    p.add_argument("--data-dir", default=None, help="folder with MNIST-like IDX files (mnist, fashion_mnist)")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from metaflow_ws.cli import print_json
    from metaflow_ws.commands.zoo import task_from_args
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.io import Zoo
    from metaflow_ws.symmetry.barrier import zoo_barrier

    t0 = time.perf_counter()
    device = resolve_device(args.device)
    zoo = Zoo.load(args.zoo, device=device)
    args.task = args.task or zoo.task
    task = task_from_args(args)
    res = zoo_barrier(
        zoo,
        task=task,
        pairs=args.pairs,
        align=args.method if args.align else None,
        align_to=args.align_to,
        grid=args.grid,
        split=args.split,
        data_seed=args.data_seed,
        generator=torch.Generator().manual_seed(args.seed),
    )
    summary = res.summary() | {"zoo": str(args.zoo), "runs": zoo.num_runs, "seed": args.seed,
                               "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print_json(summary)
        return 0
    how = f"aligned ({res.method} matching, to {res.align_to})" if res.aligned else "unaligned"
    print(f"{args.zoo} on {res.task} ({summary['split']}): {summary['pairs']} pairs of final networks, {how}, "
          f"{summary['seconds']:.1f}s")
    for k in ("barrier", "max_barrier", "midpoint_loss", "endpoint_loss"):
        print(f"  {k:<14} {summary[k + '_mean']:.4f} ± {summary[k + '_std']:.4f}")
    return 0
