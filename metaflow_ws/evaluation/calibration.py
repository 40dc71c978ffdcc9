"""Predictive distributions and calibration of a batch of networks: ECE, reliability bins, Brier score.

Everything is batched over networks: a population is a parameter dict ``{name: [B, ...]}`` (or a
:class:`~metaflow_ws.io.Zoo`), its forward pass runs under :func:`torch.func.vmap` (chunked over networks),
and every metric returns one value per network, ``[B]``.

Conventions
-----------
* ``probs``: ``(B, N, C)`` class probabilities of B networks on N inputs; ``y``: ``(N,)`` int64 labels.
* **ECE** (Guo et al. 2017): the max-probability confidence of each prediction is put in one of ``n_bins``
  equal-width bins ``(k/n_bins, (k+1)/n_bins]`` (the first bin also holds 0);
  ``ECE = Σ_bins |bin| / N · |accuracy(bin) − mean confidence(bin)|``.
* **Brier score**: the multi-class form ``mean_n Σ_c (p_nc − 1[y_n = c])²`` (range ``[0, 2]``; a uniform
  predictor over C classes scores ``1 − 1/C``). Halve it for the binary "probability of the positive class"
  convention.
* **Output scale** (temperature scaling, Guo et al. 2017): :func:`fit_output_scale` multiplies the last layer
  (weights and bias, i.e. the logits) of every network of a population by the one ``c > 0`` that minimizes their
  mean NLL on held-out data. Every network's top class, and so its accuracy, stays as it is; only the confidence
  changes. In the scale-canonical coordinates of the Normalized and Geometric flows it moves the coordinate
  ``log_scale`` of every sample by ``log c`` (README, "Output scale").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from metaflow_ws.evaluation.metrics import batch_metrics
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec, Params
from metaflow_ws.tasks.registry import Task, get_task

__all__ = [
    "ReliabilityBins",
    "as_params",
    "brier_score",
    "expected_calibration_error",
    "fit_output_scale",
    "full_metrics",
    "network_outputs",
    "predictive_probs",
    "reliability_bins",
]


def as_params(population: Zoo | Mapping[str, Tensor], spec: NetworkSpec) -> Params:
    """The batched parameter dict ``{name: [B, ...]}`` of a :class:`Zoo` or a parameter dict, checked against
    ``spec``. A zoo of another architecture raises ``ValueError``."""
    if isinstance(population, Zoo):
        if population.spec != spec:
            raise ValueError(
                f"expected {spec.describe()} networks; got a zoo of {population.spec.describe()} networks"
            )
        params = dict(population.params)
    elif isinstance(population, Mapping):
        params = dict(population)
    else:
        raise ValueError(f"expected a Zoo or a parameter dict {{name: [B, ...]}}; got {type(population).__name__}")
    spec.check(params)
    return params


def network_outputs(spec: NetworkSpec, params: Mapping[str, Tensor], x: Tensor, *, chunk: int = 1024) -> Tensor:
    """Raw outputs (logits or regression predictions) of B networks on shared inputs, vmapped in chunks of
    ``chunk`` networks.

    ``params``: ``{name: [B, ...]}``; ``x``: ``(N, in)`` (cast to the parameters' dtype and device).
    Returns ``(B, N, out)``. Differentiable with respect to ``params``.
    """
    b = spec.batch_size(params)
    if x.dim() != 2 or x.shape[1] != spec.in_features:
        raise ValueError(f"inputs must have shape (N, {spec.in_features}) for {spec.describe()}; got {tuple(x.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1; got {chunk}")
    ref = next(iter(params.values()))
    x = x.to(device=ref.device, dtype=ref.dtype)
    outs = [
        spec.batched_forward({k: v[s : s + chunk] for k, v in params.items()}, x) for s in range(0, b, chunk)
    ]
    return torch.cat(outs, dim=0)


def predictive_probs(spec: NetworkSpec, params: Mapping[str, Tensor], x: Tensor, *, chunk: int = 1024) -> Tensor:
    """Softmax class probabilities of B classifiers on shared inputs.

    ``params``: ``{name: [B, ...]}``; ``x``: ``(N, in)``. Returns ``(B, N, C)`` in the parameters' dtype.
    """
    return torch.softmax(network_outputs(spec, params, x, chunk=chunk), dim=-1)


def _check_probs_labels(probs: Tensor, y: Tensor) -> None:
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (B, N, C); got {tuple(probs.shape)}")
    if y.dim() != 1 or y.shape[0] != probs.shape[1]:
        raise ValueError(f"labels must have shape ({probs.shape[1]},) to match probs {tuple(probs.shape)}; "
                         f"got {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices; got dtype {y.dtype}")
    if probs.shape[1] == 0:
        raise ValueError("cannot compute calibration on zero inputs (N = 0)")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= probs.shape[2]):
        raise ValueError(f"labels must lie in [0, {probs.shape[2]}); got range [{int(y.min())}, {int(y.max())}]")


@dataclass(frozen=True, eq=False)
class ReliabilityBins:
    """Per-network reliability-diagram statistics over ``n_bins`` equal-width confidence bins.

    ``edges``: ``(n_bins + 1,)``; ``counts``: ``(B, n_bins)`` predictions per bin; ``confidence`` and
    ``accuracy``: ``(B, n_bins)`` mean confidence / fraction correct of each bin (0 for an empty bin).
    """

    edges: Tensor
    counts: Tensor
    confidence: Tensor
    accuracy: Tensor

    @property
    def ece(self) -> Tensor:
        """``(B,)`` expected calibration error ``Σ_bins counts/N · |accuracy − confidence|``."""
        n = self.counts.sum(-1, keepdim=True)
        return (self.counts / n * (self.accuracy - self.confidence).abs()).sum(-1)


def _bin_index(conf: Tensor, n_bins: int) -> Tensor:
    """Bin of each confidence for bins ``(k/n, (k+1)/n]`` (0 goes to the first bin)."""
    return (conf * n_bins).ceil().long().sub(1).clamp(0, n_bins - 1)


def reliability_bins(probs: Tensor, y: Tensor, *, n_bins: int = 15) -> ReliabilityBins:
    """Reliability-diagram statistics of B predictors. ``probs``: ``(B, N, C)``; ``y``: ``(N,)`` labels."""
    _check_probs_labels(probs, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1; got {n_bins}")
    conf, pred = probs.max(dim=-1)  # [B, N]
    correct = (pred == y.to(probs.device).unsqueeze(0)).to(probs.dtype)
    idx = _bin_index(conf, n_bins)
    zeros = torch.zeros(probs.shape[0], n_bins, dtype=probs.dtype, device=probs.device)
    counts = zeros.scatter_add(1, idx, torch.ones_like(conf))
    conf_sum = zeros.scatter_add(1, idx, conf)
    acc_sum = zeros.scatter_add(1, idx, correct)
    denom = counts.clamp_min(1)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    return ReliabilityBins(edges=edges, counts=counts, confidence=conf_sum / denom, accuracy=acc_sum / denom)


def expected_calibration_error(probs: Tensor, y: Tensor, *, n_bins: int = 15) -> Tensor:
    """Expected calibration error of each of B predictors with ``n_bins`` equal-width bins.

    ``probs``: ``(B, N, C)``; ``y``: ``(N,)`` labels. Returns ``(B,)``. Computed as
    ``(1/N) Σ_bins |Σ_{n ∈ bin} (correct_n − conf_n)|`` with one scatter-add over all networks.
    """
    _check_probs_labels(probs, y)
    if n_bins < 1:
        raise ValueError(f"n_bins must be ≥ 1; got {n_bins}")
    conf, pred = probs.max(dim=-1)  # [B, N]
    gap = (pred == y.to(probs.device).unsqueeze(0)).to(probs.dtype) - conf
    sums = torch.zeros(probs.shape[0], n_bins, dtype=probs.dtype, device=probs.device)
    sums = sums.scatter_add(1, _bin_index(conf, n_bins), gap)
    return sums.abs().sum(-1) / probs.shape[1]


def brier_score(probs: Tensor, y: Tensor) -> Tensor:
    """Multi-class Brier score ``mean_n Σ_c (p_nc − 1[y_n = c])²`` of each of B predictors.

    ``probs``: ``(B, N, C)``; ``y``: ``(N,)`` labels. Returns ``(B,)``.
    """
    _check_probs_labels(probs, y)
    onehot = torch.nn.functional.one_hot(y.to(probs.device), probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot.unsqueeze(0)) ** 2).sum(-1).mean(-1)


@torch.no_grad()
def full_metrics(
    task: Task | str,
    params: Zoo | Mapping[str, Tensor],
    split: str = "test",
    *,
    data_seed: int = 0,
    n_bins: int = 15,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Per-network metrics of a population on ``task``'s ``split``.

    ``task``: a registered task name or :class:`~metaflow_ws.tasks.Task`; ``params``: ``{name: [B, ...]}`` or
    a :class:`Zoo` of the task's architecture. Returns tensors ``(B,)``: ``accuracy``, ``nll`` (mean negative
    log-likelihood), ``ece`` and ``brier`` for classification; ``mse`` for regression. Accuracy, NLL and MSE
    come from :func:`~metaflow_ws.evaluation.metrics.batch_metrics`.
    """
    task = get_task(task)
    if task.kind == "synthetic":
        raise ValueError(f"task {task.name!r} is a synthetic weight family with no data to evaluate on")
    p = as_params(params, task.spec)
    if device is not None:
        p = {k: v.to(device) for k, v in p.items()}
    for k, v in p.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"parameter {k!r} contains NaN/inf values; the weights are unusable")
    ref = next(iter(p.values()))
    x, y = task.data(data_seed, device=ref.device).split(split)
    x = x.to(ref.dtype)
    if y.is_floating_point():
        y = y.to(ref.dtype)
    base = batch_metrics(task.spec, p, x, y, task.kind, chunk=chunk)
    if task.kind == "regression":
        return {"mse": base["mse"]}
    probs = predictive_probs(task.spec, p, x, chunk=chunk)
    return {
        "accuracy": base["accuracy"],
        "nll": base["loss"],
        "ece": expected_calibration_error(probs, y, n_bins=n_bins),
        "brier": brier_score(probs, y),
    }


#: bounds of the output scale :func:`fit_output_scale` searches (a network that separates the fitting data
#: perfectly has no finite optimum: its NLL falls toward 0 as c grows, so it stops at the upper bound)
SCALE_BOUNDS = (1e-2, 1e2)


@torch.no_grad()
def fit_output_scale(
    spec: NetworkSpec,
    params: Zoo | Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    bounds: tuple[float, float] = SCALE_BOUNDS,
    iters: int = 60,
    chunk: int = 1024,
) -> tuple[Params, float]:
    """Temperature scaling of B classifiers on ``(x, y)``: multiply their last layer (weights and bias) by the
    one ``c ∈ bounds`` that minimizes their mean NLL there.

    ``params``: ``{name: [B, ...]}`` or a :class:`Zoo`; ``x``: ``(N, in)``; ``y``: ``(N,)`` labels. Returns
    ``(scaled params, c)``. Classifiers only (a regression network's outputs are its predictions). The NLL of
    the logits ``c·z`` is convex in ``c`` (its second derivative is the variance of ``z`` under
    ``softmax(c·z)``), so its derivative ``mean(E_softmax(c·z_n)[z_n] − z_{n,y_n})`` rises with ``c`` and
    ``iters`` bisection steps on ``log c`` find its root (float64, all networks in one batch). Accuracy on any
    input is unchanged (``c > 0`` keeps every argmax). Fit on data the scores are not reported on: the
    validation split, as temperature scaling does (Guo et al. 2017). One ``c`` for the whole population, not
    one per network: a network that gets every point of a small validation split right has no finite optimum
    of its own (its NLL falls as c grows), and per-network fits on the 57 validation points of
    ``breast_cancer`` raise the samples' mean test NLL instead of lowering it.
    """
    p = as_params(params, spec)
    lo, hi = bounds
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"output-scale bounds must satisfy 0 < low < high < inf; got {bounds}")
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1; got {iters}")
    for k, v in p.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"parameter {k!r} contains NaN/inf values; cannot fit an output scale")
    z = network_outputs(spec, p, x, chunk=chunk).double()  # [B, N, C]
    if z.shape[-1] < 2:
        raise ValueError(f"fit_output_scale needs a classifier (≥ 2 outputs); {spec.describe()} has {z.shape[-1]}")
    _check_probs_labels(z, y)  # the (B, N, C) shape and label checks hold for logits too
    zy = z.gather(-1, y.to(z.device).view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)  # [B, N]

    def slope(log_c: float) -> float:  # d mean-NLL / dc at c = exp(log_c)
        return float(((torch.softmax(math.exp(log_c) * z, dim=-1) * z).sum(-1) - zy).mean())

    a, e = math.log(lo), math.log(hi)
    if slope(a) >= 0:  # the minimum at or below the lower bound
        log_c = a
    elif slope(e) <= 0:  # ... at or above the upper bound (data the networks separate)
        log_c = e
    else:
        for _ in range(iters):
            mid = (a + e) / 2
            a, e = (a, mid) if slope(mid) > 0 else (mid, e)  # slope > 0: past the minimum
        log_c = (a + e) / 2
    c = math.exp(log_c)
    last = spec.num_layers - 1
    out = dict(p)
    for name in (f"layers.{last}.weight", f"layers.{last}.bias"):
        out[name] = p[name] * c
    return out, c
