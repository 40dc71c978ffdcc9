"""``make demo``: the main job end to end on the bundled breast_cancer data.

Trains the zoo (100 Adam runs, the thesis recipe) with vmap and prints its summary. The flow stages are added
here as they land (zoo → flows → samples → evaluation table).
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
    args = ap.parse_args(argv)

    from metaflow_ws.cli import main as cli

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zoo_path = out / "breast_cancer_zoo.safetensors"
    print(f"[1/1] training {args.runs} breast_cancer MLPs at once (vmap) -> {zoo_path}", flush=True)
    rc = cli(["zoo", "breast_cancer", "--runs", str(args.runs), "--seed", str(args.seed), "--out", str(zoo_path)])
    if rc:
        return rc
    print(f"demo finished in {time.perf_counter() - t0:.1f}s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
