"""``make demo``: the main job end to end on the bundled breast_cancer data.

Trains the zoo (100 Adam runs, the thesis recipe) with vmap, trains the Euclidean, Normalized and Geometric flows
with demo sizes (small Relational Transformer, few steps: a few minutes on 2 CPU cores), draws 100 networks from
each and prints a table comparing them with the zoo's Adam-trained networks. For the full-size numbers see
``results/breast_cancer/``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metaflow_ws.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="output folder")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=700, help="training steps per flow")
    args = ap.parse_args(argv)

    from metaflow_ws.cli import main as cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zoo_path = out / "breast_cancer_zoo.safetensors"
    print(f"[1/2] training {args.runs} breast_cancer MLPs at once (vmap) -> {zoo_path}", flush=True)
    rc = cli(["zoo", "breast_cancer", "--runs", str(args.runs), "--seed", str(args.seed), "--out", str(zoo_path)])
    if rc:
        return rc
    print(f"[2/2] three flows x {args.steps} steps, 100 samples each -> {out}/compare", flush=True)
    rc = cli(["compare", "--zoo", str(zoo_path), "--out", str(out / "compare"), "--steps", str(args.steps),
              "--sample-steps", "32", "--seed", str(args.seed)])
    if rc:
        return rc
    print(f"demo finished in {time.perf_counter() - t0:.1f}s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
