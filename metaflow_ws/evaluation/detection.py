"""Telling trained networks from random or corrupted ones by their likelihood under a flow (AUROC).

A flow trained on a zoo assigns a log-density to any network (:func:`metaflow_ws.flows.likelihood.log_likelihood`).
If it has learned what trained weights look like, held-out trained networks should score higher than

* **random-init** networks (the task recipe's initialization),
* **noisy** trained networks (``θ + σ·RMS(θ_tensor)·ε`` for every parameter tensor),
* **row-permuted** trained networks: the rows of every hidden layer's weight and bias permuted *without*
  permuting the next layer's columns — the weight statistics of a trained network but a broken function
  (a consistent permutation would be a symmetry; this one is not).

:func:`auroc` is the area under the ROC curve in closed form (Mann–Whitney U with mid-ranks for ties): the
probability that a random positive scores higher than a random negative, ties counting ½.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec, Params

__all__ = ["auroc", "corrupt_noise", "corrupt_row_permutation", "detection_aurocs", "midranks", "random_init"]


def midranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor with ties given their average rank (``scipy.stats.rankdata``'s default)."""
    if x.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of scores; got shape {tuple(x.shape)}")
    n = x.numel()
    order = torch.argsort(x, stable=True)
    xs = x[order]
    _, counts = torch.unique_consecutive(xs, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # last 1-based rank of each tie group
    avg = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty(n, dtype=torch.float64, device=x.device)
    ranks[order] = torch.repeat_interleave(avg, counts)
    return ranks


def auroc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of scores where ``positive`` ``(P,)`` should score higher than ``negative``
    ``(N,)``: ``U / (P·N)`` with the Mann–Whitney ``U = Σ rank(positive) − P(P+1)/2`` on mid-ranks.

    Equals ``sklearn.metrics.roc_auc_score`` on labels 1 (positive) / 0 (negative). Non-finite scores are an
    error (a NaN likelihood is a bug to surface, not a score)."""
    pos, neg = positive.detach().flatten().double(), negative.detach().flatten().double()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"AUROC needs at least one positive and one negative score; got {pos.numel()} and "
                         f"{neg.numel()}")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("AUROC scores contain NaN or inf")
    ranks = midranks(torch.cat([pos, neg.to(pos.device)]))
    p = pos.numel()
    u = float(ranks[:p].sum()) - p * (p + 1) / 2
    return u / (p * neg.numel())


# -------------------------------------------------------------------------------------------- negatives
def random_init(spec: NetworkSpec, n: int, *, scheme: str = "normal", std: float = 0.1,
                generator: torch.Generator) -> Params:
    """``n`` freshly initialized networks ``{name: [n, ...]}`` (``spec.init`` with the task recipe's scheme)."""
    return spec.init(n, scheme=scheme, std=std, generator=generator)


def corrupt_noise(spec: NetworkSpec, params: Mapping[str, Tensor], scale: float, *,
                  generator: torch.Generator) -> Params:
    """Every parameter tensor of every network plus Gaussian noise of std ``scale × RMS`` of that tensor.

    ``params``: ``{name: [B, ...]}``; returns a new dict of the same shapes."""
    if scale < 0:
        raise ValueError(f"noise scale must be ≥ 0; got {scale}")
    spec.check(dict(params))
    out = {}
    for k in spec.shapes:
        v = params[k]
        rms = v.pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (v.dim() - 1)))
        eps = torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
        out[k] = v + scale * rms * eps
    return out


def corrupt_row_permutation(spec: NetworkSpec, params: Mapping[str, Tensor], *,
                            generator: torch.Generator) -> Params:
    """Rows of every hidden layer's weight matrix (and its bias) permuted at random per network, **without** the
    matching permutation of the next layer's columns: not a weight-space symmetry, so the function breaks
    while every layer keeps its set of rows. ``params``: ``{name: [B, ...]}``."""
    from metaflow_ws.symmetry.permutation import permute_rows, random_permutation

    spec.check(dict(params))
    b = spec.batch_size(dict(params))
    perms = random_permutation(spec, b, generator)
    out = {k: v.clone() for k, v in params.items()}
    for layer, perm in enumerate(perms):
        perm = perm.to(params[f"layers.{layer}.weight"].device)
        for k in (f"layers.{layer}.weight", f"layers.{layer}.bias"):
            out[k] = permute_rows(params[k], perm)
    return out


# ------------------------------------------------------------------------------------------------ AUROC
def detection_aurocs(positive: Tensor, negatives: Mapping[str, Tensor]) -> dict[str, Any]:
    """AUROC of ``positive`` log-likelihoods ``(P,)`` against every named set of negative ones, with the
    mean ± std of each set: ``{"positive": {...}, name: {"auroc", "mean", "std", "n"}}``."""
    def stats(t: Tensor) -> dict[str, float]:
        t = t.double()
        return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if t.numel() > 1 else 0.0,
                "n": int(t.numel())}

    out: dict[str, Any] = {"positive": stats(positive)}
    for name, neg in negatives.items():
        out[name] = {"auroc": auroc(positive, neg), **stats(neg)}
    return out
