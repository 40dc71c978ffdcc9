"""``metaflow-ws transfer``: task transfer by guidance, learned initialization and architecture transfer."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common, add_speed_options

NAME = "transfer"
HELP = "transfer experiments: guidance to related tasks, learned initialization, other hidden widths"
DESCRIPTION = (
    "Train flows on source zoos (digits; mnist1d; mnist with --mnist-dir), sample them with a related task's loss "
    "gradients (sweeping guidance strength x steps), train from flow samples vs default inits, and sample other "
    "hidden widths. Writes OUT/README.md, OUT/results.json and PNG plots. Presets: --quick (a couple of CPU "
    "minutes), full (default, about 30-40 CPU minutes)."
)
ORDER = 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="results/transfer", help="folder for README.md, results.json, plots and flows")
    p.add_argument("--preset", choices=["tiny", "quick", "full"], default="full",
                   help="budgets: full (default), quick (a couple of minutes), tiny (seconds, for tests)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--flow-steps", type=int, default=None, help="training steps of the digits flow")
    p.add_argument("--samples", type=int, default=None, help="networks drawn per sweep cell")
    p.add_argument("--init-seeds", type=int, default=None, help="seeds per init method in the learned-init runs")
    p.add_argument("--init-steps", type=int, default=None, help="optimizer steps of the learned-init runs")
    p.add_argument("--coupling", default=None,
                   help="coupling of the source flows' training (default ot-perm, as metaflow-ws train)")
    p.add_argument("--d-model", type=int, default=None, help="width of the source flows' vector field")
    p.add_argument("--layers", type=int, default=None, help="layers of the source flows' vector field")
    p.add_argument("--path-noise", type=float, default=None, metavar="SIGMA",
                   help="path noise of the source flows, as `train --path-noise` (default 0, not train's 0.3: a "
                        "path-noise flow pulls samples back to the source task and resists the target's guidance)")
    p.add_argument("--flow-lr", type=float, default=None, metavar="LR",
                   help="peak learning rate of the source flows (default 1e-2, as metaflow-ws train)")
    add_speed_options(p, "train the source flows")
    p.add_argument("--reuse", action="store_true",
                   help="load the source flows an earlier run saved in OUT/flows when their configuration and zoo "
                        "match, instead of retraining them")
    p.add_argument("--no-mnist1d", action="store_true", help="skip the mnist1d -> shuffled mnist1d transfer")
    p.add_argument("--mnist-dir", default=None, metavar="DIR",
                   help="also run mnist -> fashion_mnist (784-10-10, the thesis's pair) from the IDX files in DIR "
                        "(MNIST/raw and FashionMNIST/raw below it, as torchvision stores them); checked before "
                        "any work, nothing is downloaded")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    from metaflow_ws.cli import print_json
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.experiments.transfer import TransferConfig, run_transfer, write_results

    preset = "quick" if args.quick else args.preset
    overrides = {k: v for k, v in {"flow_steps": args.flow_steps, "samples": args.samples,
                                   "init_seeds": args.init_seeds, "init_steps": args.init_steps,
                                   "coupling": args.coupling, "d_model": args.d_model,
                                   "num_layers": args.layers, "path_noise": args.path_noise,
                                   "flow_lr": args.flow_lr}.items()
                 if v is not None}
    overrides |= {"compile": args.compile, "precision": args.precision, "reuse": args.reuse}
    if args.no_mnist1d:
        overrides["mnist1d"] = False
    if args.mnist_dir is not None:
        overrides["mnist_root"] = args.mnist_dir
    cfg = TransferConfig.from_preset(preset, seed=args.seed, **overrides)
    device = resolve_device(args.device)
    command = "metaflow-ws " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", ["transfer"]))
    res = run_transfer(cfg, args.out, device=device, log=lambda s: print(s, file=sys.stderr, flush=True))
    out = write_results(res, args.out, command)
    if args.json:
        print_json({"out": str(out), "goals": res["goals"], "seconds": res["seconds"]})
    else:
        for g in res["goals"]:
            print(f"{'met' if g['met'] else 'NOT met'}: {g['goal']}: {g['measured']}")
        print(f"wrote {out}/README.md")
    return 0
