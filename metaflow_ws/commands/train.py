"""``metaflow-ws train``: train a weight-space flow on a zoo."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common, add_flow_size_options, add_speed_options, flow_size

NAME = "train"
HELP = "train a Euclidean, Normalized or Geometric flow on a zoo file"
ORDER = 40


def add_arguments(p: argparse.ArgumentParser) -> None:
    from metaflow_ws.flows.couplings import COUPLINGS
    from metaflow_ws.flows.flow import SIGMA
    from metaflow_ws.flows.train import TrainConfig

    d = TrainConfig()
    p.add_argument("--zoo", required=True, help="zoo file written by `metaflow-ws zoo`")
    p.add_argument("--flow", required=True, choices=["euclidean", "normalized", "geometric"])
    p.add_argument("--out", required=True, help="output folder (config.json, flow.safetensors, checkpoints)")
    p.add_argument("--coupling", choices=list(COUPLINGS), default=d.coupling,
                   help="prior-data pairing: ot (mini-batch OT), perm (each network aligned to its prior draw), "
                        "ot-perm (both), independent")
    p.add_argument("--align", action=argparse.BooleanOptionalAction, default=d.align,
                   help="align the zoo to one reference by permutations first (default: on)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    add_flow_size_options(p)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--d-edge", type=int, default=None,
                   help="width of the edge features (default: --d-model; 32 at --d-model 64 is ≈ 1.4x faster)")
    p.add_argument("--prior-std", type=float, default=None,
                   help="σ of the prior N(0, σ²I) (default: the zoo's init scale; a synthetic task's [synthetic] prior_std)")
    p.add_argument("--path-noise", type=float, default=SIGMA, metavar="SIGMA",
                   help=f"train on path points moved by SIGMA x the data's per-block RMS (default {SIGMA}; 0 = plain "
                        "flow matching): the field learns to pull points back onto the paths, samples drift less")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    add_speed_options(p)
    add_common(p)


def run(args: argparse.Namespace) -> int:
    from metaflow_ws.cli import print_json
    from metaflow_ws.commands import progress_bar
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.flows import FlowConfig, TrainConfig, default_prior_std, train_flow
    from metaflow_ws.io import Zoo

    device = resolve_device(args.device)
    zoo = Zoo.load(args.zoo)
    size = flow_size(args, zoo.task)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=size["lr"], coupling=args.coupling,
                        align=args.align, seed=args.seed, checkpoint_every=args.checkpoint_every,
                        compile=args.compile, precision=args.precision)
    prior = args.prior_std if args.prior_std is not None else default_prior_std(zoo)
    config = FlowConfig(flow=args.flow, widths=zoo.spec.widths, activation=zoo.spec.activation, task=zoo.task,
                        prior_std=prior, d_model=size["d_model"], num_layers=size["num_layers"], heads=args.heads,
                        d_edge=args.d_edge, sigma=args.path_noise)
    bar, update = progress_bar(train.steps, f"train {args.flow}")

    def progress(step: int, total: int, loss: float, sps: float) -> None:
        update(step, total, loss)
        if step % 10 == 0:
            bar.set_postfix_str(f"loss={loss:.4f} {sps:.1f} steps/s", refresh=False)

    try:
        res = train_flow(zoo, config, train, args.out, resume=args.resume, device=device, progress=progress)
    finally:
        bar.close()
    summary = {"flow": args.flow, "out": str(args.out), "steps": train.steps, "resumed_from": res.resumed_from,
               "final_loss": res.final_loss,
               "steps_per_second": round(res.steps_per_second, 2), "seconds": round(res.seconds, 2),
               "params": sum(p.numel() for p in res.flow.field.parameters()), "d_model": config.d_model,
               "layers": config.num_layers, "lr": train.lr, "coupling": train.coupling,
               "aligned": train.align, "path_noise": config.sigma, "compiled": train.compile,
               "precision": train.precision}
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {args.flow} flow, d={config.d_model} × {config.num_layers} layers, "
              f"{summary['params']} params, lr {train.lr:g}, loss {summary['final_loss']:.4f}, "
              f"{summary['steps_per_second']} steps/s, {summary['seconds']}s")
    return 0
