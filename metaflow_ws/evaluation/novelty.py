"""Novelty of generated networks: how far each sample lies from the training zoo, in weight space.

For each sample the Euclidean distance (flat weights, :meth:`NetworkSpec.flatten` order) to its nearest training
checkpoint is divided by a *reference scale*: the median, over the reference checkpoints of the training zoo
(by default the final checkpoint of every run), of the distance to the nearest reference checkpoint of a
**different** run. A ratio near 0 means the sample (nearly) copies a training network; a ratio near 1 means it
is as far from the zoo as distinct training runs are from each other.

Weight-space distances are not symmetry-invariant: a permuted copy of a training network is far from it. Pass
``align_fn`` (e.g. alignment to a reference network from :mod:`metaflow_ws.symmetry`) to measure distances
between aligned networks; it is applied to the samples **and** to the training checkpoints, and it must map each
network on its own (a network's image may not depend on the rest of the batch), so that a training checkpoint
and an identical sample land on the same point.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from metaflow_ws.evaluation.calibration import as_params
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import Params

__all__ = ["AlignFn", "NoveltyResult", "nearest_neighbours", "novelty", "reference_scale"]

#: A batched alignment: ``{name: [B, ...]} -> {name: [B, ...]}`` of the same architecture, network by network.
AlignFn = Callable[[Params], Params]

#: Default number of pairwise distances held at once.
DEFAULT_MAX_ELEMENTS = 1 << 24


@dataclass(frozen=True, eq=False)
class NoveltyResult:
    """Novelty of S samples against a training zoo.

    ``nearest``: ``(S,)`` distance to the nearest training checkpoint; ``nearest_index``: ``(S,)`` its index in
    the training zoo; ``nearest_run``: ``(S,)`` its run id; ``reference_distances``: ``(R,)`` for each reference
    checkpoint the distance to the nearest reference checkpoint of another run; ``reference_scale``: their
    median; ``ratio``: ``(S,)`` = ``nearest / reference_scale``; ``aligned``: whether an ``align_fn`` was used.
    """

    nearest: Tensor
    nearest_index: Tensor
    nearest_run: Tensor
    reference_distances: Tensor
    reference_scale: float
    ratio: Tensor
    aligned: bool

    def summary(self, threshold: float = 0.1) -> dict[str, float]:
        """Mean / median / min / max of the ratio, and the fraction of samples with ratio below ``threshold``
        (near-copies of a training checkpoint)."""
        r = self.ratio.double()
        return {
            "reference_scale": self.reference_scale,
            "ratio_mean": float(r.mean()),
            "ratio_median": float(r.median()),
            "ratio_min": float(r.min()),
            "ratio_max": float(r.max()),
            f"fraction_below_{threshold:g}": float((r < threshold).double().mean()),
        }


def nearest_neighbours(
    a: Tensor,
    b: Tensor,
    *,
    a_group: Tensor | None = None,
    b_group: Tensor | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Distance from each row of ``a`` to its nearest row of ``b`` (Euclidean), chunked over ``a``.

    ``a``: ``(S, D)``; ``b``: ``(T, D)``. With ``a_group`` ``(S,)`` and ``b_group`` ``(T,)``, rows of ``b`` in
    the same group as the row of ``a`` are excluded (distance ``inf`` when nothing is left). Returns
    ``(distances (S,), indices (T-valued, (S,)))``. Distances are computed without the matrix-product shortcut,
    so identical rows are at distance exactly 0.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected flat weights (S, D) and (T, D) of the same D; got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[0] == 0:
        raise ValueError("cannot search for nearest neighbours among zero reference networks")
    if (a_group is None) != (b_group is None):
        raise ValueError("pass both a_group and b_group, or neither")
    if a_group is not None and (a_group.shape != (a.shape[0],) or b_group.shape != (b.shape[0],)):
        raise ValueError(f"groups must have shapes ({a.shape[0]},) and ({b.shape[0]},); "
                         f"got {tuple(a_group.shape)} and {tuple(b_group.shape)}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be ≥ 1; got {max_elements}")
    b = b.to(a.dtype)
    step = max(1, max_elements // b.shape[0])
    dists, idxs = [], []
    for s in range(0, a.shape[0], step):
        d = torch.cdist(a[s : s + step], b, compute_mode="donot_use_mm_for_euclid_dist")  # [s, T]
        if a_group is not None:
            d = d.masked_fill(a_group[s : s + step].unsqueeze(1) == b_group.unsqueeze(0), float("inf"))
        v, i = d.min(dim=1)
        dists.append(v)
        idxs.append(i)
    if not dists:
        return a.new_zeros(0), torch.zeros(0, dtype=torch.long, device=a.device)
    return torch.cat(dists), torch.cat(idxs)


def _aligned_flat(zoo_or_params: Zoo | Mapping[str, Tensor], train: Zoo, align_fn: AlignFn | None) -> Tensor:
    p = as_params(zoo_or_params, train.spec)
    if align_fn is not None:
        p = align_fn(p)
        train.spec.check(p)
    return train.spec.flatten(p)


def _select_index(zoo: Zoo, which: str) -> Tensor:
    """Indices of the ``"all"`` checkpoints or of the ``"final"`` one (largest step) of every run, by run id."""
    if which == "all":
        return torch.arange(len(zoo))
    if which != "final":
        raise ValueError(f"checkpoint selection must be 'final' or 'all'; got {which!r}")
    run, step = zoo.run_id.cpu(), zoo.step.cpu()
    key = (run - run.min()) * (int(step.max() - step.min()) + 1) + (step - step.min())
    order = torch.argsort(key, stable=True)
    sorted_run = run[order]
    last = torch.ones_like(sorted_run, dtype=torch.bool)
    last[:-1] = sorted_run[1:] != sorted_run[:-1]
    return order[last]


def _reference(flat: Tensor, run_id: Tensor, max_elements: int) -> tuple[float, Tensor]:
    """Median nearest-other-run distance of flat weights ``(R, D)`` with run ids ``(R,)``."""
    if torch.unique(run_id).numel() < 2:
        raise ValueError(
            f"the reference scale needs checkpoints of at least 2 runs; got {torch.unique(run_id).numel()} run(s)"
        )
    run_id = run_id.to(flat.device)
    d, _ = nearest_neighbours(flat, flat, a_group=run_id, b_group=run_id, max_elements=max_elements)
    return float(d.median()), d


@torch.no_grad()
def reference_scale(
    train: Zoo,
    *,
    reference: str = "final",
    align_fn: AlignFn | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> tuple[float, Tensor]:
    """Typical distance between distinct training runs: the median, over the ``reference`` checkpoints
    (``"final"``: last checkpoint of every run; ``"all"``: every checkpoint), of the distance to the nearest
    reference checkpoint of another run. Returns ``(scale, per-checkpoint distances (R,))``."""
    ref = train.select(_select_index(train, reference))
    return _reference(_aligned_flat(ref, train, align_fn), ref.run_id, max_elements)


@torch.no_grad()
def novelty(
    samples: Zoo | Mapping[str, Tensor],
    train: Zoo,
    *,
    align_fn: AlignFn | None = None,
    checkpoints: str = "all",
    reference: str = "final",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> NoveltyResult:
    """Distance of each sample to its nearest training checkpoint, relative to the distance between runs.

    ``samples``: ``{name: [S, ...]}`` or a :class:`Zoo` of ``train``'s architecture; ``train``: the training
    zoo (at least 2 runs). ``checkpoints``: which training checkpoints a sample is compared with (``"all"`` or
    ``"final"``); ``reference``: which ones define the reference scale (see :func:`reference_scale`).
    ``align_fn``: optional batched alignment applied to samples and training checkpoints alike (the training
    zoo is aligned once).
    """
    pool_index = _select_index(train, checkpoints)
    ref_index = _select_index(train, reference)
    t_all = _aligned_flat(train, train, align_fn)  # [C, D]
    scale, ref_d = _reference(t_all[ref_index], train.run_id[ref_index], max_elements)
    if not scale > 0:
        raise ValueError(f"reference scale must be positive; got {scale} (distinct training runs coincide)")
    s_flat = _aligned_flat(samples, train, align_fn)
    d, idx = nearest_neighbours(s_flat, t_all[pool_index].to(s_flat.device), max_elements=max_elements)
    index = pool_index.to(idx.device)[idx]
    return NoveltyResult(
        nearest=d,
        nearest_index=index,
        nearest_run=train.run_id.to(idx.device)[index],
        reference_distances=ref_d,
        reference_scale=scale,
        ratio=d / scale,
        aligned=align_fn is not None,
    )
