"""Family zoos: populations of networks over many tasks of one family, trained at once with ``vmap``.

A family is a task whose dataset builder takes a member argument (``sinusoid``: ``task_seed`` draws amplitude
and phase; ``digits_permuted``: ``permutation_seed``). :func:`train_family` trains ``runs_per_task`` networks on
each of ``n_tasks`` members, every network on its own member's data (one :func:`fit_population` call, data
``[R, n, d]``), and stores per network the member index (``task_id``), the member's numeric task parameters
(``task.amplitude``, ``task.phase``, ...) and its test metrics on its own task.

By default all networks start from **one shared initialisation** (``shared_init=True``): the family's weights
then lie in one basin and vary smoothly with the task, which is what a task-conditioned flow has to learn
(with independent inits, the task → weights map is scrambled by neuron permutations).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec, Params
from metaflow_ws.tasks.registry import Task, get_task
from metaflow_ws.train.optim import make_optimizer
from metaflow_ws.train.population import fit_population, init_runs, kept_steps, run_generators, run_seed, steps_per_epoch

__all__ = ["MEMBER_ARGS", "family_data", "family_members", "family_support", "per_task_metrics", "train_family"]

#: the dataset argument that picks a member of each built-in family
MEMBER_ARGS = {"sinusoid": "task_seed", "digits": "permutation_seed"}


def _member_arg(task: Task, member_arg: str | None) -> str:
    if member_arg is not None:
        return member_arg
    if task.builder not in MEMBER_ARGS:
        raise ValueError(f"task {task.name!r} (builder {task.builder!r}) is not a known family; pass member_arg= "
                         f"(the dataset argument that selects a member); known families: {sorted(MEMBER_ARGS)}")
    return MEMBER_ARGS[task.builder]


def family_members(task: Task | str, members: list[Any], member_arg: str | None = None) -> list[Task]:
    """The member tasks ``task.variant(**{member_arg: m})`` for each ``m`` in ``members``."""
    task = get_task(task)
    arg = _member_arg(task, member_arg)
    return [task.variant(**{arg: m}) for m in members]


def family_data(tasks: list[Task], split: str = "train", data_seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, list[dict]]:
    """Stack one split of every member: ``x: [T, n, in]``, ``y: [T, n]`` labels or ``[T, n, out]``, and infos."""
    if not tasks:
        raise ValueError("a family needs at least one member task")
    datas = [t.data(data_seed) for t in tasks]
    xs, ys = zip(*(d.split(split) for d in datas), strict=True)
    sizes = {x.shape for x in xs}
    if len(sizes) != 1:
        raise ValueError(f"family members must have equally sized {split} splits; got shapes {sorted(sizes)}")
    x = torch.stack(xs).to(dtype)
    y = torch.stack(ys)
    return x, (y.to(dtype) if y.is_floating_point() else y), [d.info for d in datas]


def per_task_metrics(spec: NetworkSpec, kind: str, params: Params, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Metrics of network i on its own data ``(x[i], y[i])``: ``mse`` or ``loss`` + ``accuracy``, each ``[C]``."""
    out = vmap(spec.forward)(params, x)
    if kind == "regression":
        return {"mse": ((out - y) ** 2).flatten(1).mean(1)}
    logp = torch.log_softmax(out.float(), -1)
    return {"loss": -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1),
            "accuracy": (out.argmax(-1) == y).float().mean(1)}


def train_family(
    task: Task | str,
    n_tasks: int,
    runs_per_task: int = 1,
    *,
    member_arg: str | None = None,
    first_member: int = 0,
    shared_init: bool = True,
    epochs: int | None = None,
    seed: int = 0,
    data_seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int, float], None] | None = None,
) -> Zoo:
    """Train ``runs_per_task`` networks on each of ``n_tasks`` members ``first_member, first_member + 1, ...``.

    Returns a zoo of the kept checkpoints (the recipe's ``skip_epochs``/``keep_every``), run-major, with
    ``run_id = task_id · runs_per_task + run`` and per-network metrics ``task_id``, ``task.<param>`` and
    ``test_*`` (on the network's own task).
    """
    task = get_task(task)
    if task.kind not in ("classification", "regression"):
        raise ValueError(f"task {task.name!r} has no data to train on (kind {task.kind!r})")
    if n_tasks < 1 or runs_per_task < 1:
        raise ValueError(f"n_tasks and runs_per_task must be ≥ 1; got {n_tasks} and {runs_per_task}")
    arg = _member_arg(task, member_arg)
    values = list(range(first_member, first_member + n_tasks))
    members = family_members(task, values, arg)
    rec, spec = task.recipe, task.spec
    device = torch.device(device) if device is not None else torch.device("cpu")
    t0 = time.perf_counter()
    x, y, infos = family_data(members, "train", data_seed, dtype)
    if task.kind == "classification":
        y = torch.nn.functional.one_hot(y, spec.out_features).to(dtype)
    runs = n_tasks * runs_per_task
    task_of = torch.arange(n_tasks).repeat_interleave(runs_per_task)  # [R]
    x, y = x[task_of].to(device), y[task_of].to(device)

    epochs = rec.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1; got {epochs}")
    n = x.shape[1]
    bs = min(rec.batch_size, n)
    spe = steps_per_epoch(n, bs)
    skip = min(rec.skip_epochs, epochs - 1)
    keep = set(kept_steps(epochs * spe, spe, skip, rec.keep_every))
    init_gens, order_gens = run_generators(seed, runs)
    if shared_init:
        init = init_runs(task, init_gens[:1], dtype)
        flat = spec.flatten(init).expand(runs, -1).clone()
    else:
        flat = spec.flatten(init_runs(task, init_gens, dtype))
    opt = make_optimizer(rec.optimizer, lr=rec.lr, momentum=rec.momentum, weight_decay=rec.weight_decay,
                         betas=rec.betas, eps=rec.eps, nesterov=rec.nesterov)
    all_flat, kept = fit_population(spec, task.kind, flat.to(device), x, y, opt, epochs=epochs, batch_size=bs,
                                    order_gens=order_gens, keep=keep, progress=progress)
    train_seconds = time.perf_counter() - t0
    k = len(kept)
    params = spec.unflatten(all_flat)
    net_task = task_of.repeat_interleave(k)  # [R · K]
    metrics: dict[str, Tensor] = {"task_id": net_task.to(torch.float64)}
    numeric = sorted(key for key, v in infos[0].items() if isinstance(v, int | float) and not isinstance(v, bool))
    for key in numeric:
        metrics[f"task.{key}"] = torch.tensor([float(i[key]) for i in infos], dtype=torch.float64)[net_task]
    xt, yt, _ = family_data(members, "test", data_seed, dtype)
    if xt.shape[1]:
        for name, v in per_task_metrics(spec, task.kind, params, xt[net_task].to(device),
                                        yt[net_task].to(device)).items():
            metrics[f"test_{name}"] = v.detach().cpu().to(torch.float64)
    seeds = {"seed": int(seed), "data_seed": int(data_seed), "shared_init": shared_init,
             "run_seeds": [run_seed(seed, 0)] if shared_init else [run_seed(seed, r) for r in range(runs)]}
    family = {"base_task": task.name, "member_arg": arg, "members": values, "runs_per_task": runs_per_task}
    info = {"epochs": epochs, "steps_per_epoch": spe, "batch_size": bs, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0, "device": str(device), "family": family}
    return Zoo(task=task.name, spec=spec, params={n_: v.detach().cpu() for n_, v in params.items()},
               run_id=torch.arange(runs).repeat_interleave(k), step=torch.tensor(kept, dtype=torch.int64).repeat(runs),
               metrics=metrics, recipe=asdict(rec) | {"epochs": epochs, "skip_epochs": skip}, seeds=seeds,
               task_args=dict(task.dataset_args), info=info)


def family_support(zoo: Zoo, split: str = "train"):  # noqa: ANN201 - SupportSets (import kept lazy)
    """The :class:`~metaflow_ws.flows.train.SupportSets` of a family zoo: its members' data, rebuilt from the
    zoo's metadata, and each network's task."""
    from metaflow_ws.flows.train import SupportSets

    fam = zoo.info.get("family")
    if not fam or "task_id" not in zoo.metrics:
        raise ValueError("this zoo is not a family zoo (no task ids); make one with `metaflow-ws zoo TASK --family N` "
                         "or train_family()")
    task = get_task(fam["base_task"], **{k: v for k, v in zoo.task_args.items() if k != fam["member_arg"]})
    members = family_members(task, fam["members"], fam["member_arg"])
    x, y, _ = family_data(members, split, zoo.data_seed)
    kind = task.kind
    if kind == "classification":
        y = torch.nn.functional.one_hot(y, task.spec.out_features).float()
    return SupportSets(x, y, zoo.metrics["task_id"].long(), kind)
