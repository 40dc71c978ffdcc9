"""Vmapped metrics for a batch of networks on a task's data."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec

__all__ = ["batch_metrics", "evaluate_zoo"]


@torch.no_grad()
def batch_metrics(
    spec: NetworkSpec,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    kind: str,
    *,
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Per-network metrics on ``(x, y)``: ``{"loss", "accuracy"}`` (classification; loss = mean NLL) or
    ``{"mse"}`` (regression). ``params``: ``{name: [B, ...]}``; ``x``: ``(N, in)``; returns tensors ``[B]``."""
    b = spec.batch_size(params)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows; got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty split (a synthetic task has no data)")
    outs: dict[str, list[Tensor]] = {}
    for s in range(0, b, chunk):
        p = {k: v[s : s + chunk] for k, v in params.items()}
        out = spec.batched_forward(p, x)  # [b, N, out]
        if kind == "classification":
            logp = torch.log_softmax(out.float(), dim=-1)
            nll = -logp.gather(-1, y.view(1, -1, 1).expand(out.shape[0], -1, 1)).squeeze(-1).mean(-1)
            acc = (out.argmax(-1) == y.view(1, -1)).float().mean(-1)
            outs.setdefault("loss", []).append(nll)
            outs.setdefault("accuracy", []).append(acc)
        elif kind == "regression":
            outs.setdefault("mse", []).append(((out - y.unsqueeze(0)) ** 2).mean(dim=(-1, -2)))
        else:
            raise ValueError(f"no metrics for task kind {kind!r}")
    return {k: torch.cat(v) for k, v in outs.items()}


def evaluate_zoo(task, zoo, *, split: str = "test", data_seed: int | None = None, device=None) -> dict:
    """Mean ± std of per-network metrics of a zoo-format population on ``task``'s ``split``.

    ``data_seed``: the train/val/test split (default: the one the zoo records, :attr:`Zoo.data_seed`).

    Returns ``n``, ``accuracy_mean/std``, ``nll_mean/std`` (classification) or ``mse_mean/std`` (regression).
    """
    from metaflow_ws.tasks.registry import get_task

    task = get_task(task)
    if zoo.spec != task.spec:
        raise ValueError(
            f"the weights are {zoo.spec.describe()} networks but task {task.name!r} uses {task.spec.describe()}; "
            "evaluate them on a task of the same architecture"
        )
    if task.kind == "synthetic":
        raise ValueError(f"task {task.name!r} is a synthetic weight family with no data to evaluate on")
    data_seed = zoo.data_seed if data_seed is None else int(data_seed)
    x, y = task.data(data_seed, device=device).split(split)
    params = {k: v.to(x.device, x.dtype) for k, v in zoo.params.items()}
    for k, v in params.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"parameter {k!r} contains NaN/inf values; the weights are unusable")
    m = batch_metrics(task.spec, params, x, y, task.kind)
    rename = {"loss": "nll", "accuracy": "accuracy", "mse": "mse"}
    out: dict = {"task": task.name, "split": split, "data_seed": data_seed, "n": len(zoo)}
    for k, v in m.items():
        out[f"{rename[k]}_mean"] = float(v.mean())
        out[f"{rename[k]}_std"] = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
    return out
