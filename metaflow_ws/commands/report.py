"""``metaflow-ws report``: the evaluation protocol of a task → ``results/<task>/`` (README, results.json, PNGs)."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common, add_flow_size_options, add_speed_options
from metaflow_ws.flows.couplings import COUPLINGS
from metaflow_ws.flows.flow import SIGMA
from metaflow_ws.flows.sampling import SampleConfig

NAME = "report"
HELP = "train zoo and flows, sample, evaluate against baselines and write results/<task>/ (README + plots)"
DESCRIPTION = (
    "Run the evaluation protocol on TASK: train (or load) the zoo, train the Euclidean, Normalized and Geometric "
    "flows (aligned, --coupling as in `train`, default ot-perm; for breast_cancer also the thesis's unaligned / "
    "aligned / aligned+OT grid plus aligned+OT+perm), sample, and "
    "compare with the trained networks, a deep ensemble, noise baselines and aligned averages (accuracy, NLL, ECE, "
    "Brier, diversity, novelty, BMA), sweep steps / guidance / stochastic noise / time grid, measure loss barriers and the "
    "likelihood AUROC. Writes OUT/README.md, OUT/results.json and OUT/figures/*.png; flows stay in OUT/flows/ "
    "(--reuse loads them). gaussian_toy runs the thesis's §4.1 reproduction."
)
ORDER = 75


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="registered task (breast_cancer, digits, mnist1d, gaussian_toy, ...)")
    p.add_argument("--quick", action="store_true",
                   help="a few-minute run with tiny flows and few samples (checks the pipeline; not real numbers)")
    p.add_argument("--out", default=None, help="output folder (default: results/TASK)")
    p.add_argument("--zoo", default=None, help="use this zoo file instead of training one")
    p.add_argument("--reuse", action="store_true",
                   help="reuse OUT/zoo.safetensors and the flows in OUT/flows/ whose saved configuration matches")
    p.add_argument("--runs", type=int, default=None, help="zoo runs (default: the task recipe's; --quick: 10)")
    p.add_argument("--epochs", type=int, default=None, help="zoo epochs (default: the recipe's)")
    p.add_argument("--steps", type=int, default=None, help="flow training steps (default 3000; --quick: 300)")
    p.add_argument("--ablation-steps", type=int, default=None,
                   help="training steps of the flows × {unaligned, aligned, aligned+OT, aligned+OT+perm} grid "
                        "(default: --steps)")
    p.add_argument("--coupling", choices=COUPLINGS, default=None,
                   help="coupling of the headline flows (default ot-perm, as `metaflow-ws train`)")
    p.add_argument("--no-ablation", action="store_true", help="skip the alignment/coupling grid")
    p.add_argument("--path-noise", type=float, default=None, metavar="SIGMA",
                   help=f"path noise of every flow, as `train --path-noise` (default {SIGMA}; 0 = plain flow matching)")
    add_flow_size_options(p, "every flow", quick=True)
    p.add_argument("-n", "--samples", type=int, default=None, help="samples per flow (default 100; --quick: 32)")
    p.add_argument("--sample-steps", type=int, default=None, help="integration steps (default 64; --quick: 16)")
    p.add_argument("--rho", type=float, default=SampleConfig.rho,
                   help=f"time grid of the samples, as `sample --rho` (default {SampleConfig.rho:g}); the report "
                        "also sweeps it")
    p.add_argument("--lik-networks", type=int, default=None, help="networks per population for the likelihood AUROC")
    p.add_argument("--lik-estimator", choices=["exact", "hutchinson"], default=None)
    add_speed_options(p, "train the flows")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from pathlib import Path

    from metaflow_ws.cli import print_json
    from metaflow_ws.experiments.report import ReportConfig, run_report

    out = Path(args.out) if args.out else Path("results") / args.task
    overrides = {k: v for k, v in {
        "zoo_path": args.zoo, "runs": args.runs, "epochs": args.epochs, "steps": args.steps,
        "ablation_steps": args.ablation_steps, "d_model": args.d_model, "num_layers": args.layers,
        "path_noise": args.path_noise, "lr": args.lr, "samples": args.samples, "sample_steps": args.sample_steps,
        "lik_networks": args.lik_networks, "lik_estimator": args.lik_estimator, "coupling": args.coupling, "rho": args.rho,
    }.items() if v is not None}
    overrides |= {"seed": args.seed, "reuse": args.reuse, "device": args.device}
    overrides |= {"compile": args.compile, "precision": args.precision}
    if args.no_ablation:
        overrides["ablation"] = False
    if args.quick:
        cfg = ReportConfig.quick_budget(args.task, out, **overrides)
    else:
        cfg = ReportConfig(task=args.task, out_dir=out, **overrides)
    command = "metaflow-ws " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", ["report", "--task", args.task]))
    res = run_report(cfg, command=command, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print_json({"out": str(out), "seconds": res.get("seconds"), "goals": res.get("goals"),
                    "readme": str(out / "README.md")})
    else:
        print(f"wrote {out / 'README.md'} ({res.get('seconds', 0) / 60:.1f} min)")
    return 0
