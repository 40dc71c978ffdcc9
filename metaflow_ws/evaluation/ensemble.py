"""Bayesian model averaging (BMA) of a population: metrics of the averaged predictive vs ensemble size.

For classification the averaged predictive of the first k networks of an ordering is the mean of their softmax
probabilities, ``p̄_k = (1/k) Σ_{i ≤ k} p_{σ(i)}``; it is computed for every k at once in log space
(``log p̄_k = logcumsumexp_i log p_{σ(i)} − log k``), so NLL stays finite and accurate. For regression the
averaged prediction is the mean output. With several random orderings the curves are averaged over orderings
(the per-ordering curves are kept in :attr:`BMACurve.per_ordering`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metaflow_ws.evaluation.calibration import (
    as_params,
    brier_score,
    expected_calibration_error,
    network_outputs,
)
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec

__all__ = ["BMACurve", "bma_curve", "bma_curve_from_outputs", "ensemble_metrics"]


@dataclass(frozen=True, eq=False)
class BMACurve:
    """Metrics of the model average of the first k networks, for k = 1..K.

    ``ks``: ``(K,)`` int64. Classification: ``accuracy``, ``nll`` (mean NLL of the averaged predictive),
    ``ece`` and ``brier``, each ``(K,)``, and ``mse`` is None; regression: ``mse`` ``(K,)`` and the others None.
    Values are means over the ``orders.shape[0]`` orderings; ``orders``: ``(R, K)`` network indices;
    ``per_ordering``: ``{metric: (R, K)}``.
    """

    kind: str
    ks: Tensor
    orders: Tensor
    accuracy: Tensor | None = None
    nll: Tensor | None = None
    ece: Tensor | None = None
    brier: Tensor | None = None
    mse: Tensor | None = None
    per_ordering: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_orderings(self) -> int:
        return int(self.orders.shape[0])

    def final(self) -> dict[str, float]:
        """Metrics of the full average (k = K) as floats."""
        return {k: float(v[-1]) for k, v in self._curves().items()}

    def _curves(self) -> dict[str, Tensor]:
        names = ("accuracy", "nll", "ece", "brier", "mse")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _orders(
    b: int,
    order: Tensor | None,
    num_orderings: int | None,
    generator: torch.Generator | None,
    max_k: int | None,
    device: torch.device,
) -> Tensor:
    """``(R, K)`` network indices of the orderings."""
    if num_orderings is not None:
        if order is not None:
            raise ValueError("pass either an explicit order or num_orderings (random orderings), not both")
        if num_orderings < 1:
            raise ValueError(f"num_orderings must be ≥ 1; got {num_orderings}")
        if generator is None:
            raise ValueError("random orderings need an explicit torch.Generator (generator=...); got None")
        orders = torch.rand(num_orderings, b, generator=generator).argsort(dim=1)
    elif order is None:
        orders = torch.arange(b).unsqueeze(0)
    else:
        orders = torch.as_tensor(order).long()
        if orders.dim() == 1:
            orders = orders.unsqueeze(0)
        if orders.dim() != 2 or orders.shape[1] == 0:
            raise ValueError(f"order must have shape (K,) or (R, K) with K ≥ 1; got {tuple(orders.shape)}")
        if int(orders.min()) < 0 or int(orders.max()) >= b:
            raise ValueError(f"order holds network indices outside [0, {b}); got range "
                             f"[{int(orders.min())}, {int(orders.max())}]")
    if max_k is not None:
        if max_k < 1:
            raise ValueError(f"max_k must be ≥ 1; got {max_k}")
        orders = orders[:, :max_k]
    return orders.to(device)


@torch.no_grad()
def bma_curve_from_outputs(
    outputs: Tensor,
    y: Tensor,
    kind: str = "classification",
    *,
    order: Tensor | None = None,
    num_orderings: int | None = None,
    generator: torch.Generator | None = None,
    max_k: int | None = None,
    n_bins: int = 15,
) -> BMACurve:
    """BMA curve from precomputed network outputs.

    ``outputs``: ``(B, N, out)`` logits (classification) or predictions (regression); ``y``: ``(N,)`` labels or
    ``(N, out)`` targets. Orderings: by default the networks in the given order ``0..B−1``; ``order``: ``(K,)``
    or ``(R, K)`` explicit network indices; ``num_orderings=R`` with ``generator``: R random permutations.
    ``max_k`` truncates every ordering to its first ``max_k`` networks.
    """
    if outputs.dim() != 3:
        raise ValueError(f"outputs must have shape (B, N, out); got {tuple(outputs.shape)}")
    b, n, _ = outputs.shape
    if n == 0:
        raise ValueError("cannot evaluate an ensemble on zero inputs (N = 0)")
    if y.shape[0] != n:
        raise ValueError(f"targets must have {n} rows to match outputs {tuple(outputs.shape)}; got {tuple(y.shape)}")
    orders = _orders(b, order, num_orderings, generator, max_k, outputs.device)
    k = orders.shape[1]
    ks = torch.arange(1, k + 1, device=outputs.device)
    per: dict[str, list[Tensor]] = {}
    if kind == "classification":
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError(f"classification targets must be (N,) integer labels; got {tuple(y.shape)} {y.dtype}")
        y = y.to(outputs.device)
        logp = torch.log_softmax(outputs, dim=-1)
        log_k = torch.log(ks.to(logp.dtype)).view(-1, 1, 1)
        idx = y.view(1, -1, 1).expand(k, -1, 1)
        for row in orders:  # loop over orderings (R), never over networks
            log_mean = torch.logcumsumexp(logp[row], dim=0) - log_k  # [K, N, C]
            per.setdefault("nll", []).append(-log_mean.gather(-1, idx).squeeze(-1).mean(-1))
            per.setdefault("accuracy", []).append((log_mean.argmax(-1) == y.unsqueeze(0)).to(logp.dtype).mean(-1))
            probs = log_mean.exp()
            per.setdefault("ece", []).append(expected_calibration_error(probs, y, n_bins=n_bins))
            per.setdefault("brier", []).append(brier_score(probs, y))
    elif kind == "regression":
        target = y.to(outputs.device, outputs.dtype)
        if target.dim() == 1:
            target = target.unsqueeze(-1)
        if target.shape != outputs.shape[1:]:
            raise ValueError(f"regression targets must have shape {tuple(outputs.shape[1:])}; got {tuple(y.shape)}")
        kk = ks.to(outputs.dtype).view(-1, 1, 1)
        for row in orders:
            mean = outputs[row].cumsum(0) / kk  # [K, N, out]
            per.setdefault("mse", []).append(((mean - target.unsqueeze(0)) ** 2).mean(dim=(1, 2)))
    else:
        raise ValueError(f"kind must be 'classification' or 'regression'; got {kind!r}")
    stacked = {name: torch.stack(v) for name, v in per.items()}  # [R, K]
    return BMACurve(kind=kind, ks=ks, orders=orders, per_ordering=stacked,
                    **{name: v.mean(0) for name, v in stacked.items()})


@torch.no_grad()
def bma_curve(
    spec: NetworkSpec,
    params: Zoo | Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    kind: str = "classification",
    *,
    order: Tensor | None = None,
    num_orderings: int | None = None,
    generator: torch.Generator | None = None,
    max_k: int | None = None,
    n_bins: int = 15,
    chunk: int = 1024,
) -> BMACurve:
    """BMA curve of a population on ``(x, y)``: accuracy / NLL / ECE / Brier (or MSE) of the average of the
    first k networks, k = 1..K.

    ``params``: ``{name: [B, ...]}`` or a :class:`Zoo`; ``x``: ``(N, in)``; ``y``: ``(N,)`` labels or
    ``(N, out)`` targets. See :func:`bma_curve_from_outputs` for the orderings. Memory: ``K × N × C`` per
    ordering.
    """
    outputs = network_outputs(spec, as_params(params, spec), x, chunk=chunk)
    return bma_curve_from_outputs(outputs, y, kind, order=order, num_orderings=num_orderings,
                                  generator=generator, max_k=max_k, n_bins=n_bins)


@torch.no_grad()
def ensemble_metrics(
    spec: NetworkSpec,
    params: Zoo | Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    kind: str = "classification",
    *,
    n_bins: int = 15,
    chunk: int = 1024,
) -> dict[str, float]:
    """Metrics of the model average of the whole population (the deep-ensemble predictive):
    ``accuracy``, ``nll``, ``ece``, ``brier`` (classification) or ``mse`` (regression), as floats.

    ``params``: ``{name: [B, ...]}`` or a :class:`Zoo`; ``x``: ``(N, in)``; ``y``: ``(N,)`` or ``(N, out)``.
    """
    outputs = network_outputs(spec, as_params(params, spec), x, chunk=chunk)
    b = outputs.shape[0]
    if kind == "classification":
        log_mean = torch.logsumexp(torch.log_softmax(outputs, dim=-1), dim=0, keepdim=True) - math.log(b)
        return bma_curve_from_outputs(log_mean, y, kind, n_bins=n_bins).final()
    return bma_curve_from_outputs(outputs.mean(0, keepdim=True), y, kind).final()
