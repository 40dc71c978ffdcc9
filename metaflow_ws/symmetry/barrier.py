"""Loss barriers along linear paths between networks (linear mode connectivity).

For a pair (θa, θb) and the path θ(α) = (1−α)·θa + α·θb, the *midpoint barrier* is
``L(θ(½)) − (L(θa) + L(θb))/2`` and the *max barrier* is ``max_α L(θ(α)) − ((1−α)·L(θa) + α·L(θb))`` over a grid of
α in [0, 1] (endpoints included, so it is ≥ 0). All pairs and all α are evaluated in one ``vmap`` (chunked).
Permutation alignment of θb to θa before interpolating (:mod:`metaflow_ws.symmetry.align`) typically shrinks
the barrier strongly: the barrier of unaligned networks is mostly a symmetry artefact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import vmap

from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec, Params
from metaflow_ws.tasks.registry import Task, get_task
from metaflow_ws.train.losses import loss_fn

__all__ = ["BarrierResult", "ZooBarrierResult", "loss_barrier", "random_pairs", "zoo_barrier"]


def _mean_std(t: Tensor) -> tuple[float, float]:
    t = t.double()
    return float(t.mean()), float(t.std(unbiased=False)) if t.numel() > 1 else 0.0


@dataclass(frozen=True)
class BarrierResult:
    """Losses along the linear paths between P pairs of networks.

    Attributes:
        alphas: ``[G]`` interpolation weights (``linspace(0, 1, G)``).
        losses: ``[P, G]`` task loss of ``(1−α)·θa + α·θb``; column 0 is θa, column G−1 is θb.
        midpoint_loss: ``[P]`` loss at α = ½.
        barrier: ``[P]`` midpoint barrier ``midpoint_loss − (L(θa) + L(θb))/2``.
        max_barrier: ``[P]`` ``max_α L(θ(α)) − ((1−α)·L(θa) + α·L(θb))`` over ``alphas``.
        split: the data split the losses were measured on.
    """

    alphas: Tensor
    losses: Tensor
    midpoint_loss: Tensor
    barrier: Tensor
    max_barrier: Tensor
    split: str

    @property
    def loss_a(self) -> Tensor:
        """``[P]`` loss of the first network of each pair."""
        return self.losses[:, 0]

    @property
    def loss_b(self) -> Tensor:
        """``[P]`` loss of the second network of each pair."""
        return self.losses[:, -1]

    def summary(self) -> dict[str, Any]:
        """Means ± population std over pairs, as plain floats."""
        out: dict[str, Any] = {"pairs": int(self.barrier.numel()), "grid": int(self.alphas.numel()),
                               "split": self.split}
        for name, t in (("barrier", self.barrier), ("max_barrier", self.max_barrier),
                        ("midpoint_loss", self.midpoint_loss),
                        ("endpoint_loss", torch.cat([self.loss_a, self.loss_b]))):
            out[f"{name}_mean"], out[f"{name}_std"] = _mean_std(t)
        return out


def _batched(spec: NetworkSpec, params: Mapping[str, Tensor], what: str) -> Params:
    try:
        spec.check(params, batched=False)
        return {n: params[n].unsqueeze(0) for n in spec.shapes}
    except ValueError:
        pass
    try:
        spec.check(params)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return {n: params[n] for n in spec.shapes}


def loss_barrier(
    task: Task | str,
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    grid: int = 11,
    split: str = "test",
    data_seed: int = 0,
    chunk: int = 4096,
) -> BarrierResult:
    """Loss barriers between ``params_a`` and ``params_b`` on ``task``'s ``split``.

    Args:
        task: a :class:`Task` or registered name (classification or regression; its architecture must match).
        params_a, params_b: ``{name: [P, ...]}`` pairs (or one unbatched network each).
        grid: number of α values in ``linspace(0, 1, grid)`` (≥ 2); the midpoint is evaluated in any case.
        split: ``"train"``, ``"val"`` or ``"test"``.
        data_seed: seed of the task's train/val/test split (use the zoo's ``seeds["data_seed"]``).
        chunk: interpolated networks per vmapped forward (bounds memory).

    Returns:
        :class:`BarrierResult` with ``[P]`` barriers and the ``[P, G]`` loss curves.
    """
    task = get_task(task)
    spec = task.spec
    if task.kind == "synthetic":
        raise ValueError(f"task {task.name!r} is a synthetic weight family with no data; loss barriers need a "
                         "classification or regression task")
    if grid < 2:
        raise ValueError(f"grid must hold at least 2 points (the two endpoints); got {grid}")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1; got {chunk}")
    a = _batched(spec, params_a, f"params_a do not fit task {task.name!r}")
    b = _batched(spec, params_b, f"params_b do not fit task {task.name!r}")
    pa, pb = spec.batch_size(a), spec.batch_size(b)
    if pa != pb:
        raise ValueError(f"params_a and params_b must hold the same number of networks; got {pa} and {pb}")
    fa, fb = spec.flatten(a), spec.flatten(b)  # [P, D]
    for name, f in (("params_a", fa), ("params_b", fb)):
        if not torch.isfinite(f).all():
            bad = (~torch.isfinite(f).all(1)).nonzero().flatten().tolist()
            raise ValueError(f"{name} contain NaN or infinite values (networks {bad[:10]})")
    dtype, device = fa.dtype, fa.device
    x, y = task.data(int(data_seed), device=device).split(split)
    if x.shape[0] == 0:
        raise ValueError(f"split {split!r} of task {task.name!r} is empty")
    x = x.to(dtype)
    if task.kind == "classification":  # one-hot targets: same loss, elementwise kernels under vmap
        y = torch.nn.functional.one_hot(y, spec.out_features).to(dtype)
    else:
        y = y.to(dtype)

    alphas = torch.linspace(0.0, 1.0, grid, dtype=torch.float64)
    evals = torch.cat([alphas, torch.tensor([0.5], dtype=torch.float64)]).to(device, dtype)  # [G+1]
    k = evals.numel()
    batched_loss = vmap(loss_fn(spec, task.kind), in_dims=(0, None, None))
    per_chunk = max(1, chunk // k)
    rows = []
    with torch.no_grad():
        for s in range(0, pa, per_chunk):
            ca, cb = fa[s : s + per_chunk], fb[s : s + per_chunk]
            theta = (1 - evals).view(1, k, 1) * ca.unsqueeze(1) + evals.view(1, k, 1) * cb.unsqueeze(1)
            rows.append(batched_loss(spec.unflatten(theta.reshape(-1, theta.shape[-1])), x, y).view(-1, k))
    losses_all = torch.cat(rows) if rows else torch.zeros(0, k, dtype=dtype, device=device)
    losses, mid = losses_all[:, :grid], losses_all[:, grid]
    la, lb = losses[:, :1], losses[:, -1:]
    al = alphas.to(device, dtype).view(1, -1)
    max_barrier = (losses - ((1 - al) * la + al * lb)).amax(dim=1)
    barrier = mid - 0.5 * (la[:, 0] + lb[:, 0])
    return BarrierResult(alphas=alphas.to(dtype), losses=losses, midpoint_loss=mid, barrier=barrier,
                         max_barrier=max_barrier, split=split)


def random_pairs(n: int, pairs: int, generator: torch.Generator | None = None) -> Tensor:
    """``[P, 2]`` random pairs of distinct indices in ``0 .. n-1``, no unordered pair drawn twice.

    ``pairs`` may not exceed the ``n(n−1)/2`` distinct pairs. ``generator=None`` → a generator seeded 0.
    """
    total = n * (n - 1) // 2
    if n < 2:
        raise ValueError(f"pairs of distinct networks need at least 2 of them; got {n}")
    if not 1 <= pairs <= total:
        raise ValueError(f"the number of pairs must lie in [1, {total}] (the distinct pairs of {n} networks); "
                         f"got {pairs}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    # Rank the unordered pairs i < j, draw ranks without replacement and decode (no n² table needed).
    if total <= 2**24:
        ranks = torch.randperm(total, generator=g)[:pairs]
    else:
        seen: set[int] = set()
        while len(seen) < pairs:
            seen.update(torch.randint(total, (2 * (pairs - len(seen)),), generator=g).tolist())
        ranks = torch.tensor(sorted(seen))[torch.randperm(len(seen), generator=g)[:pairs]]
    r = ranks.double()
    # rank of (i, j), i < j, counting pairs with smaller j first: j(j−1)/2 + i.
    j = torch.floor((1 + torch.sqrt(1 + 8 * r)) / 2).long()
    j = torch.where(j * (j - 1) // 2 > ranks, j - 1, j)
    j = torch.where((j + 1) * j // 2 <= ranks, j + 1, j)
    i = ranks - j * (j - 1) // 2
    swap = torch.rand(pairs, generator=g) < 0.5  # random roles of first / second network
    return torch.stack([torch.where(swap, j, i), torch.where(swap, i, j)], dim=1)


@dataclass(frozen=True)
class ZooBarrierResult:
    """Barriers between random pairs of final checkpoints of a zoo.

    Attributes:
        result: the :class:`BarrierResult` of the P pairs.
        run_pairs: ``[P, 2]`` run ids of the two networks of each pair.
        aligned: whether the networks were permutation-aligned before interpolating.
        method: ``"weight"`` / ``"activation"`` when aligned, else ``None``.
        align_to: ``"pair"`` (second network aligned to the first) or ``"reference"`` (every final network aligned
            to the first run's) when aligned, else ``None``.
        task: the task whose data gave the losses.
    """

    result: BarrierResult
    run_pairs: Tensor
    aligned: bool
    method: str | None
    align_to: str | None
    task: str

    def summary(self) -> dict[str, Any]:
        return {"task": self.task, **self.result.summary(), "aligned": self.aligned, "method": self.method,
                "align_to": self.align_to}


def zoo_barrier(
    zoo: Zoo,
    *,
    task: Task | str | None = None,
    pairs: int | None = None,
    align: Literal["weight", "activation"] | None = None,
    align_to: Literal["pair", "reference"] = "pair",
    grid: int = 11,
    split: str = "test",
    data_seed: int | None = None,
    generator: torch.Generator | None = None,
) -> ZooBarrierResult:
    """Loss barriers between random pairs of distinct runs' final checkpoints (``zoo.final()``).

    Args:
        zoo: the population.
        task: the task whose data to use (default: ``zoo.task``); its architecture must be the zoo's.
        pairs: number of pairs (default: ``min(100, R(R−1)/2)`` for R runs).
        align: ``None`` (raw weights), ``"weight"`` or ``"activation"`` (probe = the task's training inputs).
        align_to: ``"pair"`` aligns the second network of each pair to the first; ``"reference"`` aligns every
            final network to the first run's final network, as a canonicalized zoo is.
        grid, split: as in :func:`loss_barrier`.
        data_seed: the split's seed (default: the zoo's ``seeds["data_seed"]``, the data it was trained on).
        generator: draws the pairs and the alignment's layer order; ``None`` → a generator seeded 0.
    """
    from metaflow_ws.symmetry.align import align as align_fn

    task = get_task(task if task is not None else zoo.task)
    if task.spec != zoo.spec:
        raise ValueError(f"the zoo holds {zoo.spec.describe()} networks but task {task.name!r} uses "
                         f"{task.spec.describe()}; pass a task of the same architecture")
    if task.kind == "synthetic":
        raise ValueError(f"task {task.name!r} is a synthetic weight family with no data; loss barriers need a "
                         "classification or regression task")
    if align not in (None, "weight", "activation"):
        raise ValueError(f"unknown alignment method {align!r}; expected 'weight', 'activation' or None")
    if align_to not in ("pair", "reference"):
        raise ValueError(f"align_to must be 'pair' or 'reference'; got {align_to!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    data_seed = zoo.data_seed if data_seed is None else int(data_seed)
    final = zoo.final()
    r = len(final)
    if r < 2:
        raise ValueError(f"loss barriers need final checkpoints of at least 2 runs; the zoo has {r}")
    total = r * (r - 1) // 2
    pairs = min(100, total) if pairs is None else int(pairs)
    idx = random_pairs(r, pairs, g)
    params = final.params
    pa = {n: t[idx[:, 0]] for n, t in params.items()}
    pb = {n: t[idx[:, 1]] for n, t in params.items()}
    if align is not None:
        probe = task.data(data_seed).x_train if align == "activation" else None
        if align_to == "pair":
            pb = align_fn(zoo.spec, pb, pa, method=align, probe=probe, generator=g).params
        else:
            ref = zoo.spec.state_dict_of(params, 0)
            aligned = align_fn(zoo.spec, params, ref, method=align, probe=probe, generator=g).params
            pa = {n: t[idx[:, 0]] for n, t in aligned.items()}
            pb = {n: t[idx[:, 1]] for n, t in aligned.items()}
    res = loss_barrier(task, pa, pb, grid=grid, split=split, data_seed=data_seed)
    run_pairs = final.run_id[idx]
    return ZooBarrierResult(result=res, run_pairs=run_pairs, aligned=align is not None, method=align,
                            align_to=align_to if align is not None else None, task=task.name)

