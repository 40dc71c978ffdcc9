"""``metaflow-ws sample``: draw networks from a trained flow into a zoo-format file."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common, add_speed_options, parse_widths

NAME = "sample"
HELP = "sample N networks from a trained flow (Euler/Heun, stochastic, guided)"
ORDER = 50


def add_arguments(p: argparse.ArgumentParser) -> None:
    from metaflow_ws.flows.sampling import GUIDANCE_POINTS, SOLVERS, SampleConfig

    p.add_argument("--flow", required=True, help="flow folder written by `metaflow-ws train`")
    p.add_argument("-n", "--num", type=int, default=100, help="number of networks")
    p.add_argument("--steps", type=int, default=64, help="integration steps")
    p.add_argument("--solver", choices=list(SOLVERS), default=SampleConfig().solver)
    p.add_argument("--rho", type=float, default=SampleConfig().rho,
                   help="time grid t_i = 1 - (1 - i/steps)^rho: 1 = uniform, larger = smaller steps near t = 1, the "
                        f"data end (default {SampleConfig().rho:g})")
    p.add_argument("--noise", type=float, default=0.0, help="stochastic sampling strength ε")
    p.add_argument("--noise-window", type=float, nargs=2, default=(0.0, 1.0), metavar=("T0", "T1"),
                   help="add noise only for t in [T0, T1)")
    p.add_argument("--guidance", type=float, default=0.0, help="task-loss guidance strength λ (needs --task)")
    p.add_argument("--guidance-normalize", action="store_true",
                   help="scale each sample's guidance gradient to unit norm (λ becomes a speed in flow coordinates)")
    p.add_argument("--guidance-at", choices=list(GUIDANCE_POINTS), default=SampleConfig().guidance_at,
                   help="where the guidance gradient is taken: x, the current point x_t (default, the thesis's form); "
                        "x1, the flow's prediction of the network the sample is heading for")
    p.add_argument("--fit-scale", action="store_true",
                   help="temperature-scale the samples: multiply every sample's last layer by the one factor c "
                        "that minimizes their mean NLL on the task's validation split (needs --task; classification; "
                        "accuracy unchanged, see README \"Output scale\")")
    p.add_argument("--task", default=None, help="task whose training loss guides sampling (and whose validation "
                                                "split --fit-scale uses)")
    p.add_argument("--guidance-batch", type=int, default=256, help="training points used for guidance")
    p.add_argument("--widths", type=parse_widths, default=None, metavar="W",
                   help="architecture transfer: sample networks of other hidden layers than the flow's, e.g. "
                        "30-16-16-16-2 (same inputs and outputs; other depths need a flow trained on networks "
                        "with two or more hidden layers)")
    p.add_argument("--grow", action="store_true",
                   help="with --widths: sample the flow's own architecture and grow every sample to W without "
                        "changing its function (Net2Net: copied neurons, identity layers; wider/deeper only)")
    p.add_argument("--out", required=True, help="output zoo-format .safetensors file")
    add_speed_options(p, "run the vector field")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from metaflow_ws.cli import print_json
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.flows import SampleConfig, WeightFlow, sample
    from metaflow_ws.io import Zoo
    from metaflow_ws.nets import NetworkSpec, check_growth, grow
    from metaflow_ws.tasks import get_task

    if args.num < 1:
        raise ValueError(f"-n must be ≥ 1; got {args.num}")
    device = resolve_device(args.device)
    flow = WeightFlow.from_pretrained(args.flow, device=device)
    own = flow.spec
    target = own if args.widths is None else NetworkSpec(args.widths, own.activation)
    if args.grow:
        if args.widths is None:
            raise ValueError("--grow needs --widths W (the wider and/or deeper architecture to grow the samples to)")
        check_growth(own, target.widths)
    elif args.widths is not None:
        flow = flow.for_spec(target)
    data_seed = int(flow.meta.get("zoo_data_seed", 0))  # the split of the zoo the flow learned from
    cfg = SampleConfig(steps=args.steps, solver=args.solver, rho=args.rho, noise=args.noise, noise_window=tuple(args.noise_window),
                       guidance=args.guidance, guidance_normalize=args.guidance_normalize,
                       guidance_at=args.guidance_at)
    gdata = task = None
    if args.guidance > 0 or args.fit_scale:
        if args.task is None:
            flag = "--guidance" if args.guidance > 0 else "--fit-scale"
            raise ValueError(f"{flag} needs --task TASK (the task whose data it uses: the training split guides, "
                             "the validation split fits the output scale)")
        task = get_task(args.task)
        if args.fit_scale and task.kind != "classification":
            raise ValueError(f"--fit-scale needs a classification task; {task.name!r} is a {task.kind} task")
        if args.widths is not None and not args.grow:
            task = task.with_widths(args.widths)
        flow.check_spec(task.spec, what=f"task {task.name!r}")
    if args.guidance > 0:
        d = task.data(data_seed, device=device)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(d.x_train.shape[0], generator=g)[: args.guidance_batch].to(device)
        gdata = (d.x_train[idx], d.y_train[idx], task.kind)
    t0 = time.perf_counter()
    with flow.compiled(args.compile), flow.autocast(args.precision):
        x = sample(flow, args.num, cfg, generator=torch.Generator().manual_seed(args.seed), guidance_data=gdata)
    params = flow.decode(x)
    if not all(torch.isfinite(v).all() for v in params.values()):
        raise FloatingPointError("sampling produced NaN/inf weights; try more --steps or a smaller --guidance")
    if args.grow:  # the copies' draws come from their own seeded generator, after sampling
        params = grow(own, params, target.widths, generator=torch.Generator().manual_seed(args.seed + 1))
    scale = None
    if args.fit_scale:
        from metaflow_ws.evaluation import fit_output_scale

        xv, yv = task.data(data_seed, device=device).split("val")
        if xv.shape[0] == 0:
            raise ValueError(f"--fit-scale needs a validation split; task {task.name!r} has none (val_fraction 0)")
        params, scale = fit_output_scale(target, params, xv, yv)
    seconds = time.perf_counter() - t0
    name = args.task or flow.config.task
    if target != own:
        name = f"{name}[{'-'.join(map(str, target.widths))}]"
    zoo = Zoo.from_params(name, target, {k: v.cpu() for k, v in params.items()},
                          seeds={"seed": args.seed, "data_seed": data_seed},
                          info={"source": "flow", "flow": str(args.flow), "flow_kind": flow.config.flow,
                                "sampler": {"steps": cfg.steps, "solver": cfg.solver, "rho": cfg.rho,
                                            "noise": cfg.noise,
                                            "noise_window": list(cfg.noise_window), "guidance": cfg.guidance,
                                            "guidance_normalize": cfg.guidance_normalize,
                                            "guidance_at": cfg.guidance_at},
                                **({"output_scale": scale} if scale is not None else {}),
                                **({"grown_from": list(own.widths)} if args.grow else {}),
                                "seed": args.seed, "seconds": seconds, "compiled": args.compile,
                                "precision": args.precision})
    zoo.save(args.out)
    res = {"out": str(args.out), "n": args.num, "flow": flow.config.flow, "steps": cfg.steps, "solver": cfg.solver,
           "rho": cfg.rho, "seconds": round(seconds, 3), "compiled": args.compile, "precision": args.precision,
           **({"output_scale": scale} if scale is not None else {})}
    if args.json:
        print_json(res)
    else:
        print(f"wrote {args.out}: {args.num} {flow.config.flow}-flow samples ({cfg.solver}, {cfg.steps} steps, rho {cfg.rho:g}) "
              f"in {seconds:.2f}s" + ("" if scale is None else f"; output scale {scale:.4g} fitted on the validation split"))
    return 0
