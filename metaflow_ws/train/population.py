"""Population training: R networks of one task trained at once with ``vmap(grad(...))``.

Every network has its own init and its own data order, drawn from per-run generators seeded by
``run_seed(seed, r)``, so run r is reproducible alone: :func:`run_generators` and :func:`init_runs` give exactly
what a plain ``torch.optim`` loop needs to reproduce it (see ``tests/test_population.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from metaflow_ws.evaluation.metrics import batch_metrics
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec, Params
from metaflow_ws.tasks.registry import Task, get_task
from metaflow_ws.train.losses import loss_fn
from metaflow_ws.train.optim import FunctionalOptimizer, make_optimizer

__all__ = ["fit_population", "init_runs", "kept_steps", "run_generators", "run_seed", "steps_per_epoch", "train_population"]


def run_seed(seed: int, run: int) -> int:
    """Seed of run ``run`` of a population seeded ``seed`` (independent of the population size)."""
    return (int(seed) * 1_000_003 + int(run) * 7_919 + 12_345) % (2**63 - 1)


def run_generators(seed: int, runs: int) -> tuple[list[torch.Generator], list[torch.Generator]]:
    """Per-run generators: (init generators, data-order generators)."""
    init = [torch.Generator().manual_seed(run_seed(seed, r)) for r in range(runs)]
    order = [torch.Generator().manual_seed(run_seed(seed, r) + 1) for r in range(runs)]
    return init, order


def init_runs(task: Task, gens: list[torch.Generator], dtype: torch.dtype = torch.float32) -> Params:
    """Initial parameters ``{name: [R, ...]}`` from the recipe's init, one generator per run."""
    rec = task.recipe
    return task.spec.stack(
        {k: v[0] for k, v in task.spec.init(1, scheme=rec.init, std=rec.init_std, generator=g, dtype=dtype).items()}
        for g in gens
    )


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def kept_steps(total_steps: int, spe: int, skip_epochs: int, keep_every: int) -> list[int]:
    """Optimizer steps (1-based) whose iterates are kept: after ``skip_epochs`` epochs, every ``keep_every``-th
    step counted back from the last one (so the final weights are always kept)."""
    first = skip_epochs * spe + 1
    return [s for s in range(first, total_steps + 1) if (total_steps - s) % keep_every == 0]


def fit_population(
    spec: NetworkSpec,
    kind: str,
    flat: Tensor,
    x: Tensor,
    y: Tensor,
    opt: FunctionalOptimizer,
    *,
    epochs: int,
    batch_size: int,
    order_gens: list[torch.Generator],
    keep: set[int] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[Tensor, list[int]]:
    """Train ``R`` networks at once with minibatch ``opt`` steps (the core of every population trainer).

    ``flat: [R, D]`` initial weights; data ``x: [n, ...]`` shared by all runs or ``[R, n, ...]`` one dataset per
    run (task families); ``y`` likewise (one-hot float targets for classification). Every run draws its own
    epoch order from ``order_gens[r]``. Returns the iterates after the optimizer steps in ``keep`` (1-based;
    default: only the last) as ``[R · K, D]`` run-major, and the kept step numbers.
    """
    runs = flat.shape[0]
    per_run = x.dim() == 3  # networks are MLPs on flat inputs: shared data is [n, d], per-run data [R, n, d]
    if per_run and (x.shape[0] != runs or y.shape[0] != runs):
        raise ValueError(f"per-run data must have {runs} datasets (one per run); got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    n = x.shape[1] if per_run else x.shape[0]
    if y.shape[int(per_run)] != n:
        raise ValueError(f"x and y disagree on the number of examples: x {tuple(x.shape)}, y {tuple(y.shape)}")
    if len(order_gens) != runs:
        raise ValueError(f"need one order generator per run: {len(order_gens)} for {runs} runs")
    bs = min(batch_size, n)
    spe = steps_per_epoch(n, bs)
    total = epochs * spe
    keep = {total} if keep is None else keep
    state = opt.init(flat)
    grad_fn = vmap(grad_and_value(loss_fn(spec, kind)))
    names = spec.names
    rows = torch.arange(runs, device=flat.device).unsqueeze(1)

    def step_fn(flat: Tensor, xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        grads, losses = grad_fn(spec.unflatten(flat), xb, yb)  # dict in, dict out: cheaper than a flat vmap
        return torch.cat([grads[k].reshape(runs, -1) for k in names], dim=1), losses

    kept_flat: list[Tensor] = []
    kept_step: list[int] = []
    step = 0
    for _epoch in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in order_gens]).to(flat.device)  # [R, n]
        # one gather per epoch; each step takes a slice
        x_ep, y_ep = (x[rows, order], y[rows, order]) if per_run else (x[order], y[order])
        for s in range(spe):
            sl = slice(s * bs, (s + 1) * bs)
            grads, losses = step_fn(flat, x_ep[:, sl], y_ep[:, sl])
            flat, state = opt.step(flat, grads, state)
            step += 1
            if step in keep:
                kept_flat.append(flat.detach().clone())
                kept_step.append(step)
            if progress is not None:
                progress(step, total, float(losses.mean()))
        if not torch.isfinite(flat).all():
            bad = (~torch.isfinite(flat).all(1)).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"training diverged at epoch {_epoch + 1}: runs {bad[:10]} have NaN/inf weights; lower the learning rate"
            )
    k = len(kept_step)
    return torch.stack(kept_flat, dim=1).reshape(runs * k, -1), kept_step  # run-major


def train_population(
    task: Task | str,
    runs: int | None = None,
    *,
    epochs: int | None = None,
    seed: int = 0,
    data_seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int, float], None] | None = None,
    evaluate: bool = True,
) -> Zoo:
    """Train ``runs`` networks of ``task`` with its recipe and return the kept checkpoints as a :class:`Zoo`.

    ``epochs`` overrides the recipe (skip_epochs is clipped to it). ``progress(step, total, loss_mean)`` is called
    after every optimizer step. Metrics (``train_/val_/test_`` ``loss``/``accuracy`` or ``mse``) are evaluated on
    every checkpoint with vmap unless ``evaluate=False``.
    """
    task = get_task(task)
    rec = task.recipe
    runs = rec.runs if runs is None else int(runs)
    if runs < 1:
        raise ValueError(f"runs must be ≥ 1; got {runs}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    spec = task.spec
    seeds = {"seed": int(seed), "data_seed": int(data_seed), "run_seeds": [run_seed(seed, r) for r in range(runs)]}
    t0 = time.perf_counter()

    if task.kind == "synthetic":
        syn = task.synthetic
        assert syn is not None
        g = torch.Generator().manual_seed(int(seed))
        flat = syn.target_mean + syn.target_std * torch.randn(runs, spec.num_params, generator=g, dtype=dtype)
        return Zoo.from_flat(task.name, spec, flat.to(device), recipe=asdict(rec), seeds=seeds,
                             task_args=task.dataset_args, info={"synthetic": asdict(syn), "seconds": time.perf_counter() - t0})

    epochs = rec.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1; got {epochs}")
    skip = min(rec.skip_epochs, epochs - 1)
    data = task.data(data_seed, device=device)
    x, y = data.x_train.to(dtype), data.y_train
    if y.is_floating_point():
        y = y.to(dtype)
    elif task.kind == "classification":  # one-hot targets: same loss, elementwise kernels under vmap
        y = torch.nn.functional.one_hot(y, spec.out_features).to(dtype)
    n = x.shape[0]
    bs = min(rec.batch_size, n)
    spe = steps_per_epoch(n, bs)
    total = epochs * spe
    keep = set(kept_steps(total, spe, skip, rec.keep_every))

    init_gens, order_gens = run_generators(seed, runs)
    flat = spec.flatten(init_runs(task, init_gens, dtype)).to(device)  # [R, D]
    opt = make_optimizer(rec.optimizer, lr=rec.lr, momentum=rec.momentum, weight_decay=rec.weight_decay,
                         betas=rec.betas, eps=rec.eps, nesterov=rec.nesterov)
    all_flat, kept_step = fit_population(spec, task.kind, flat, x, y, opt, epochs=epochs, batch_size=bs,
                                         order_gens=order_gens, keep=keep, progress=progress)
    train_seconds = time.perf_counter() - t0
    k = len(kept_step)
    run_id = torch.arange(runs).repeat_interleave(k)
    steps = torch.tensor(kept_step, dtype=torch.int64).repeat(runs)
    params = spec.unflatten(all_flat)
    metrics: dict[str, Tensor] = {}
    for split in ("train", "val", "test") if evaluate else ():
        xs, ys = data.split(split)
        if xs.shape[0] == 0:
            continue
        for name, v in batch_metrics(spec, params, xs.to(dtype), ys.to(dtype) if ys.is_floating_point() else ys,
                                     task.kind).items():
            metrics[f"{split}_{name}"] = v.cpu()
    info = {"epochs": epochs, "steps_per_epoch": spe, "batch_size": bs, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0,
            "device": str(device)}
    rec_d = asdict(rec) | {"epochs": epochs, "skip_epochs": skip}
    return Zoo(task=task.name, spec=spec, params={k_: v.cpu() for k_, v in params.items()}, run_id=run_id,
               step=steps, metrics=metrics, recipe=rec_d, seeds=seeds, task_args=dict(task.dataset_args), info=info)
