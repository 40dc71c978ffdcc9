"""``metaflow-ws compare``: zoo → every flow → samples → a results table (markdown + JSON)."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common, add_flow_size_options, add_speed_options, flow_size

NAME = "compare"
HELP = "train the three flows on a zoo, sample, and write a comparison table with the target networks"
ORDER = 70


def add_arguments(p: argparse.ArgumentParser) -> None:
    from metaflow_ws.flows.sampling import SampleConfig

    p.add_argument("--zoo", required=True, help="zoo file written by `metaflow-ws zoo`")
    p.add_argument("--out", required=True, help="folder for README.md, results.json and the trained flows")
    p.add_argument("--flows", nargs="+", default=["euclidean:ot-perm", "normalized:ot-perm", "geometric:ot-perm"],
                   help="flow variants: NAME[:COUPLING][:unaligned] with COUPLING one of ot, perm, ot-perm "
                        "(default: all three, aligned, OT + perm coupling)")
    p.add_argument("--steps", type=int, default=3000, help="training steps per flow")
    add_flow_size_options(p, "every flow")
    p.add_argument("-n", "--samples", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=64)
    p.add_argument("--solver", choices=["euler", "heun"], default="euler")
    p.add_argument("--rho", type=float, default=SampleConfig.rho,
                   help=f"time grid of the samples, as `sample --rho` (default {SampleConfig.rho:g})")
    add_speed_options(p, "train the flows")
    add_common(p)


def parse_run(text: str):
    from metaflow_ws.experiments.flows_table import FlowRun

    name, *opts = text.split(":")
    couplings = [o for o in opts if o in ("ot", "perm", "ot-perm")]
    unknown = set(opts) - {"ot", "perm", "ot-perm", "unaligned"}
    if name not in ("euclidean", "normalized", "geometric") or unknown or len(couplings) > 1:
        raise ValueError(f"bad flow variant {text!r}; expected euclidean|normalized|geometric with optional "
                         ":ot, :perm or :ot-perm and/or :unaligned")
    return FlowRun(name, coupling=couplings[0] if couplings else "independent", align="unaligned" not in opts)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    import time
    from pathlib import Path

    from metaflow_ws.cli import print_json
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.experiments.flows_table import compare_flows, markdown_table
    from metaflow_ws.flows import SampleConfig, TrainConfig
    from metaflow_ws.io import Zoo, atomic_write_json, atomic_write_text

    runs = [parse_run(r) for r in args.flows]
    zoo = Zoo.load(args.zoo)
    device = resolve_device(args.device)
    out = Path(args.out)
    t0 = time.perf_counter()
    size = flow_size(args, zoo.task)
    train = TrainConfig(steps=args.steps, lr=size["lr"], compile=args.compile, precision=args.precision)
    sampler = SampleConfig(steps=args.sample_steps, solver=args.solver, rho=args.rho)
    rows = compare_flows(zoo, runs=runs, train=train, d_model=size["d_model"],
                         num_layers=size["num_layers"], samples=args.samples,
                         sampler=sampler, seed=args.seed,
                         out_dir=out / "flows", device=device, log=lambda s: print(s, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    command = "metaflow-ws " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", ["compare"]))
    table = markdown_table(rows)
    text = (f"# {zoo.task}: flows vs the trained networks\n\n"
            f"Written by `{command}` (seed {args.seed}, device {device}) in {seconds:.0f} s.\n\n"
            f"Zoo: `{args.zoo}`, made by `metaflow-ws zoo {zoo.task} --runs {zoo.num_runs} --seed "
            f"{zoo.seeds.get('seed', 0)} --out {args.zoo}` — {len(zoo)} checkpoints, {zoo.spec.describe()}. Each flow: "
            f"Relational Transformer d={size['d_model']}, {size['num_layers']} layers, {args.steps} steps (batch 32, "
            f"AdamW lr {size['lr']}); {args.samples} samples with {args.solver}, {args.sample_steps} steps, time grid ρ = {sampler.rho:g}; "
            f"metrics on "
            f"the test split, mean ± std over networks.\n\n{table}\n")
    atomic_write_text(out / "README.md", text)
    atomic_write_json(out / "results.json", {"command": command, "seconds": seconds, "rows": rows})
    if args.json:
        print_json({"rows": rows, "seconds": seconds, "out": str(out)})
    else:
        print(table)
    return 0
