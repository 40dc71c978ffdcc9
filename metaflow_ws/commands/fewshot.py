"""``metaflow-ws fewshot``: meta-train the few-shot methods of a family and score them in one protocol."""

from __future__ import annotations

import argparse

from metaflow_ws.commands import add_common

NAME = "fewshot"
HELP = "meta-train MAML-family baselines (and registered methods) and score them on held-out few-shot tasks"
DESCRIPTION = (
    "Meta-train every method with the same budget on a task family (sinusoid regression or N-way K-shot digits), "
    "then score it on held-out tasks: propose an init (best of --candidates on the support loss), fine-tune "
    "0/1/10 SGD steps on the support set, measure query MSE or accuracy (mean ± 95% CI). Writes OUT/README.md, "
    "OUT/results.json, the meta-trained states (OUT/state/FAMILY/METHOD.safetensors) and, for sinusoid, a plot."
)
ORDER = 80


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", required=True, help="few-shot task family: sinusoid or digits (or a registered one)")
    p.add_argument("--shots", type=int, nargs="+", default=None,
                   help="support sizes K of the test tasks (per class for digits; default: sinusoid 5 10 20, "
                        "digits 1 5)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods to run (default: every registered one: maml fomaml anil metasgd reptile pretrain "
                        "scratch, plus plug-ins such as flow)")
    p.add_argument("--iterations", type=int, default=20_000, help="meta-training iterations of every method")
    p.add_argument("--tasks", type=int, default=600, help="number of held-out test tasks")
    p.add_argument("--steps", type=int, nargs="+", default=[0, 1, 10], help="fine-tuning steps to measure after")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tuning SGD learning rate at test time (default: the family's, sinusoid 0.01, digits 0.4)")
    p.add_argument("--candidates", type=int, default=1,
                   help="candidate inits per task (the lowest support loss is kept; deterministic methods give one)")
    p.add_argument("--meta-batch", type=int, default=25, help="tasks per meta-iteration")
    p.add_argument("--inner-lr", type=float, default=None,
                   help="inner-loop SGD learning rate in meta-training (default: the family's, sinusoid 0.01, "
                        "digits 0.4)")
    p.add_argument("--inner-steps", type=int, default=1, help="inner-loop SGD steps in meta-training")
    p.add_argument("--outer-lr", type=float, default=1e-3, help="Adam learning rate of the outer loop")
    p.add_argument("--reptile-steps", type=int, default=5, help="Reptile's inner SGD steps (on support ∪ query)")
    p.add_argument("--train-shots", type=int, default=None,
                   help="support size of meta-training episodes (default: sinusoid 10, digits 5 per class)")
    p.add_argument("--train-query", type=int, default=None,
                   help="query size of meta-training episodes (default: sinusoid 10, digits 15 per class)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the held-out test tasks (fixed across methods)")
    p.add_argument("--out", default="results/fewshot", help="output folder (default: results/fewshot)")
    p.add_argument("--label", default=None,
                   help="name of this run's section in OUT/results.json and OUT/README.md and of its state folder "
                        "(default: the family name)")
    p.add_argument("--reuse", action="store_true",
                   help="load saved meta-trained states from OUT/state instead of retraining (settings must match)")
    p.add_argument("--reuse-from", default=None, metavar="LABEL",
                   help="like --reuse, but load the states of another run's section (OUT/state/LABEL), e.g. to "
                        "re-score a flow with more --candidates under a new --label")
    p.add_argument("--plot-tasks", type=int, default=4, help="sinusoid test tasks drawn in the fits plot (0: no plot)")
    p.add_argument("--plot-methods", nargs="+", default=["maml", "flow"],
                   help="methods drawn in the sinusoid fits plot, one row each, when they run (default: maml flow)")
    p.add_argument("--method-option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="set a field of a method's settings, repeatable, e.g. flow.query_weight=1 or "
                        "flow.sample_steps=4 (fields of FlowMethodConfig for flow)")
    p.add_argument("--budget-note", default="", help="a sentence recorded in the README (e.g. a reduced budget)")
    add_common(p)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import datetime
    import shlex
    import sys
    import time
    from pathlib import Path

    import torch

    from metaflow_ws.cli import print_json
    from metaflow_ws.errors import resolve_device
    from metaflow_ws.fewshot.baselines import MetaConfig, get_method, method_names, method_settings, \
        parse_method_options
    from metaflow_ws.fewshot.episodes import get_family, stream_generator
    from metaflow_ws.fewshot.protocol import load_method_state, run_protocol, save_method_state
    from metaflow_ws.fewshot.report import plot_sinusoid_fits, update_results

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    family = get_family(args.family)
    known = method_names()
    methods = list(dict.fromkeys(args.methods or known))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown few-shot method(s) {unknown}; expected some of {known}")
    options = parse_method_options(args.method_option)
    stray = sorted(set(options) - set(methods))
    if stray:
        raise ValueError(f"--method-option names method(s) {stray} that this run does not include ({methods})")
    for name, opts in options.items():
        method_settings(name, opts)  # fail before any training on an unknown option or a bad value
    shots = sorted(set(args.shots or family.test_shots))
    if any(k < 1 for k in shots):
        raise ValueError(f"--shots must be ≥ 1; got {args.shots}")
    for k in ("tasks", "candidates"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k} must be ≥ 1; got {getattr(args, k)}")
    if any(s < 0 for s in args.steps):
        raise ValueError(f"--steps must be ≥ 0; got {args.steps}")
    lr = family.lr if args.lr is None else args.lr
    inner_lr = family.lr if args.inner_lr is None else args.inner_lr
    if not lr > 0:
        raise ValueError(f"--lr must be positive; got {lr}")
    label = args.label or family.name
    for flag, value in (("--label", label), ("--reuse-from", args.reuse_from)):
        # labels name a folder under OUT/state: no separators, no leading dot
        if value is not None and (value.startswith(".")
                                  or not value.replace("_", "").replace("-", "").replace(".", "").isalnum()):
            raise ValueError(f"{flag} must use letters, digits, '.', '-' and '_' (not first '.'); got {value!r}")
    source = args.reuse_from or label
    if args.reuse_from is not None and not (Path(args.out) / "state" / source).is_dir():
        raise ValueError(f"--reuse-from {source!r}: no saved states in {Path(args.out) / 'state' / source}")
    reuse = args.reuse or args.reuse_from is not None
    steps = sorted(set(args.steps))
    config = MetaConfig(iterations=args.iterations, meta_batch=args.meta_batch, inner_lr=inner_lr,
                        inner_steps=args.inner_steps, outer_lr=args.outer_lr, train_shots=args.train_shots,
                        train_query=args.train_query, reptile_steps=args.reptile_steps,
                        log_every=max(1, min(1000, args.iterations // 10)))
    device = resolve_device(args.device)
    out = Path(args.out)
    test = {k: ep.to(device) for k, ep in family.test_set(shots, n_tasks=args.tasks, seed=args.test_seed).items()}
    command = "metaflow-ws " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", ["fewshot"]))
    can_plot = family.kind == "regression" and family.spec.in_features == 1 and hasattr(family, "function")
    plot_methods = [m for m in methods if m in args.plot_methods] if can_plot else []
    n_plot = min(args.plot_tasks, args.tasks) if plot_methods else 0

    example = test[shots[0]]
    entry = {
        "label": label,
        "family": family.name,
        "title": "sine regression (MAML benchmark)" if family.kind == "regression"
        else f"{getattr(family, 'n_way', '?')}-way K-shot classification over held-out classes",
        "description": family.describe(),
        "architecture": family.spec.describe(),
        "metric": "mse" if family.kind == "regression" else "accuracy",
        "protocol": (f"K ∈ {{{', '.join(map(str, shots))}}} support points"
                     f"{' per class' if family.kind == 'classification' else ''} (nested: a K-shot support set is "
                     "the first K points of every larger one; tasks and query sets are shared across K), "
                     + (f"{example.query_size} query points per task" if family.kind == "regression"
                        else f"{family.test_query} query examples per class")),
        "command": command, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seed": args.seed, "test_seed": args.test_seed, "num_tasks": args.tasks, "shots": shots, "steps": steps,
        "lr": lr, "candidates": args.candidates,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "log_every"},
        "train_shots": config.train_shots or family.train_shots,
        "train_query": config.train_query or family.train_query,
        "budget_note": args.budget_note, "method_options": options,
        "plot": None, "plot_shots": shots[0], "plot_methods": [], "methods": {}, "planned_methods": methods, "complete": False, "seconds": 0.0,
    }
    kept: dict = {}
    for name in methods:
        method = get_method(name, family, config, device=device, seed=args.seed, options=options.get(name))
        state_path = out / "state" / source / f"{name}.safetensors"
        has_state = bool(method.state_dict())
        if reuse and has_state and state_path.is_file():
            train = {**load_method_state(method, state_path), "reused": True}
            log(f"{name}: loaded {state_path}")
        else:
            if args.reuse_from is not None and has_state:
                raise ValueError(f"--reuse-from {source!r}: no saved state for {name} at {state_path}")
            log(f"{name}: meta-training ({args.iterations} iterations)" if has_state else f"{name}: no meta-training")
            train = method.meta_train(family, iterations=args.iterations,
                                      generator=stream_generator(args.seed, "train"), log=log)
            if has_state:
                save_method_state(method, state_path, train)
        res = {}
        for k, ep in test.items():
            r = run_protocol(method, ep, steps=steps, lr=lr, n_candidates=args.candidates,
                             generator=stream_generator(args.seed, "propose"),
                             keep=n_plot if (name in plot_methods and k == shots[0]) else 0)
            res[str(k)] = r.to_dict()
            if r.kept:
                kept[name] = r.kept
            log(f"{name} K={k}: " + ", ".join(f"{s.steps} steps {s.mean:.4f} ± {s.ci95:.4f}" for s in r.results))
        entry["methods"][name] = {"train": train, "results": res,
                                  "state": str(state_path.relative_to(out)) if has_state else None}
        if name in kept:
            plot_path = out / f"{label}_fits.png"
            plot_sinusoid_fits(plot_path, family, example.task_params[:n_plot].cpu(),
                               example.support_x[:n_plot].cpu(), example.support_y[:n_plot].cpu(), kept, steps)
            entry["plot"], entry["plot_methods"] = plot_path.name, list(kept)
        # written after every method, so a later failure keeps the methods already scored
        entry["complete"] = name == methods[-1]
        entry["seconds"] = time.perf_counter() - t_start
        update_results(out, label, entry)
    if args.json:
        print_json(entry)
    else:
        from metaflow_ws.fewshot.report import markdown_family

        print(markdown_family(json_roundtrip(entry)))
    return 0


def json_roundtrip(obj):  # the README is rendered from JSON; render stdout the same way
    import json

    return json.loads(json.dumps(obj, default=str))
