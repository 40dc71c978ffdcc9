"""The plain reference for population training: each network alone, as an ``nn.Module`` with ``torch.optim``.

Uses the same per-run inits and data orders as :func:`~metaflow_ws.train.population.train_population`, so the
two agree to float tolerance (``tests/test_population.py``) and can be timed side by side
(``benchmarks/bench_population.py``).
"""

from __future__ import annotations

import torch

from metaflow_ws.nets.spec import MLP
from metaflow_ws.tasks.registry import Task, get_task
from metaflow_ws.train.losses import prediction_loss
from metaflow_ws.train.population import init_runs, run_generators

__all__ = ["train_with_torch_optim"]


def train_with_torch_optim(task: Task | str, runs: int, *, epochs: int | None = None, seed: int = 0,
                           data_seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    """Train ``runs`` networks one after another with ``torch.optim``; returns their final state dicts."""
    task = get_task(task)
    rec = task.recipe
    if rec.optimizer not in ("adam", "sgd"):
        raise ValueError(f"task {task.name!r} is not trained (optimizer {rec.optimizer!r})")
    epochs = rec.epochs if epochs is None else epochs
    data = task.data(data_seed)
    x, y = data.x_train.to(dtype), data.y_train
    if y.is_floating_point():
        y = y.to(dtype)
    n, bs = x.shape[0], min(rec.batch_size, x.shape[0])
    init_gens, order_gens = run_generators(seed, runs)
    init = init_runs(task, init_gens, dtype)
    finals = []
    for r in range(runs):
        m = MLP(task.spec.widths, task.spec.activation).to(dtype)
        m.load_state_dict({k: v[r] for k, v in init.items()})
        if rec.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(m.parameters(), lr=rec.lr, betas=rec.betas, eps=rec.eps,
                                                          weight_decay=rec.weight_decay)
        else:
            opt = torch.optim.SGD(m.parameters(), lr=rec.lr, momentum=rec.momentum, weight_decay=rec.weight_decay,
                                  nesterov=rec.nesterov)
        for _ in range(epochs):
            order = torch.randperm(n, generator=order_gens[r])
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                opt.zero_grad()
                prediction_loss(m(x[idx]), y[idx], task.kind).backward()
                opt.step()
        finals.append({k: v.detach() for k, v in m.state_dict().items()})
    return finals
