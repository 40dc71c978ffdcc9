"""Functional diversity of a population: how differently its networks behave on a fixed input set.

Classification: the mean pairwise **Jensen–Shannon divergence** (natural log, so in ``[0, log 2]``) between the
networks' predictive distributions, per input, averaged over inputs and over all pairs ``i < j``. For
categorical outputs it is exact::

    JS(p, q) = H((p + q) / 2) − (H(p) + H(q)) / 2,      H(p) = −Σ_c p_c log p_c.

How this differs from the thesis's estimate
    The thesis (Erdogan 2025) measured the divergence between networks' *output densities* with kernel density
    estimates: samples of each network's outputs were smoothed with a kernel, and JS was computed between the
    two smoothed densities. That estimate depends on a bandwidth and is biased (smoothing pulls two densities
    together and lowers JS; few samples in high dimension raise it), so numbers from different sample sizes or
    bandwidths do not compare. Here each network's output *is* a categorical distribution per input, so JS is
    computed in closed form from the softmax probabilities: no bandwidth, no estimation bias, deterministic,
    and differences between populations come from the networks alone. It measures disagreement of the
    predictive distributions input by input (two networks with the same marginal output histogram but different
    per-input predictions are diverse here, not under a density-of-outputs estimate).

Disagreement (classification, a scale-free companion): the mean over pairs ``i < j`` of the fraction of inputs on
which the two networks' top classes differ (Fort et al. 2019). JS also grows with the networks' confidence, so a
population of sharper networks looks more diverse at the same errors; disagreement counts only different
decisions. Exact in O(B·N) from the class counts ``m_c`` per input: ``(B² − Σ_c m_c²) / (B(B − 1))``.

Regression: the mean pairwise mean squared difference of predictions,
``mean_{i<j} mean_{n,o} (f_i(x_n)_o − f_j(x_n)_o)²``, computed exactly in O(B) as
``2/(B−1) · Σ_i mean_{n,o} (f_i − f̄)²``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metaflow_ws.evaluation.calibration import as_params, network_outputs
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec

__all__ = [
    "entropy",
    "functional_diversity",
    "js_divergence",
    "mean_pairwise_disagreement",
    "mean_pairwise_js",
    "mean_pairwise_msd",
    "pairwise_js_matrix",
    "prediction_disagreement",
]

#: Default number of elements (pairs × N × C) materialised at once by the pairwise JS.
DEFAULT_MAX_ELEMENTS = 1 << 22


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of categorical distributions along ``dim`` (``0 · log 0 = 0``)."""
    return -torch.special.xlogy(p, p).sum(dim)


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Exact Jensen–Shannon divergence (nats) between categorical distributions on the last dim.

    ``p``, ``q``: ``(..., C)`` (broadcastable). Returns ``(...)``, in ``[0, log 2]``.
    """
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(f"p and q must have the same number of classes; got {p.shape[-1]} and {q.shape[-1]}")
    js = entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2
    return js.clamp_min(0)


def _check_probs(probs: Tensor) -> None:
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (B, N, C); got {tuple(probs.shape)}")
    if probs.shape[1] == 0:
        raise ValueError("need at least one input (N ≥ 1) to compare predictive distributions")


def _pair_chunk(n: int, c: int, max_elements: int) -> int:
    if max_elements < 1:
        raise ValueError(f"max_elements must be ≥ 1; got {max_elements}")
    return max(1, max_elements // max(1, n * c))


def _pair_js(probs: Tensor, ent: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Input-averaged JS of the pairs ``(i[k], j[k])``: ``(P,)``. ``ent``: ``(B, N)`` entropies of ``probs``."""
    h_mix = entropy((probs[i] + probs[j]) / 2)  # [P, N]
    return (h_mix - (ent[i] + ent[j]) / 2).clamp_min(0).mean(-1)


def _pairwise_js_values(probs: Tensor, max_elements: int) -> tuple[Tensor, Tensor]:
    """JS of all pairs i < j: (``(2, P)`` pair indices, ``(P,)`` values), chunked over pairs."""
    b, n, c = probs.shape
    pairs = torch.triu_indices(b, b, offset=1, device=probs.device)
    ent = entropy(probs)  # [B, N]
    step = _pair_chunk(n, c, max_elements)
    vals = [_pair_js(probs, ent, pairs[0, s : s + step], pairs[1, s : s + step]) for s in range(0, pairs.shape[1], step)]
    return pairs, torch.cat(vals) if vals else probs.new_zeros(0)


def mean_pairwise_js(probs: Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """Mean over all pairs ``i < j`` of the input-averaged JS divergence between networks' predictive
    distributions.

    ``probs``: ``(B, N, C)``, ``B ≥ 2``. Returns a 0-dim tensor in ``[0, log 2]``. At most ``max_elements``
    mixture probabilities (pairs × N × C) are held at once.
    """
    _check_probs(probs)
    if probs.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 networks; got {probs.shape[0]}")
    return _pairwise_js_values(probs, max_elements)[1].mean()


def pairwise_js_matrix(probs: Tensor, *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """Symmetric ``(B, B)`` matrix of input-averaged JS divergences (zero diagonal). ``probs``: ``(B, N, C)``."""
    _check_probs(probs)
    b = probs.shape[0]
    pairs, vals = _pairwise_js_values(probs, max_elements)
    out = probs.new_zeros(b, b)
    out[pairs[0], pairs[1]] = vals
    out[pairs[1], pairs[0]] = vals
    return out


def mean_pairwise_msd(preds: Tensor) -> Tensor:
    """Mean over pairs ``i < j`` of the mean squared difference of two networks' predictions.

    ``preds``: ``(B, N, out)``, ``B ≥ 2``. Returns a 0-dim tensor; exact, via
    ``Σ_{i<j} ‖a_i − a_j‖² = B Σ_i ‖a_i − ā‖²``.
    """
    if preds.dim() != 3:
        raise ValueError(f"preds must have shape (B, N, out); got {tuple(preds.shape)}")
    b = preds.shape[0]
    if b < 2:
        raise ValueError(f"diversity needs at least 2 networks; got {b}")
    if preds.shape[1] == 0:
        raise ValueError("need at least one input (N ≥ 1) to compare predictions")
    centred = preds - preds.mean(0, keepdim=True)
    return 2.0 / (b - 1) * (centred**2).mean(dim=(1, 2)).sum()


def mean_pairwise_disagreement(labels: Tensor, num_classes: int | None = None) -> Tensor:
    """Mean over pairs ``i < j`` of the fraction of inputs where networks ``i`` and ``j`` predict different classes.

    ``labels``: ``(B, N)`` integer predictions of B ≥ 2 networks on N ≥ 1 inputs; ``num_classes`` (default: the
    largest label + 1). Returns a 0-dim float tensor in ``[0, 1]``: exact, from the class counts per input.
    """
    if labels.dim() != 2 or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be (B, N) integer class predictions; got {tuple(labels.shape)} {labels.dtype}")
    b, n = labels.shape
    if b < 2:
        raise ValueError(f"disagreement needs at least 2 networks; got {b}")
    if n == 0:
        raise ValueError("need at least one input (N ≥ 1) to compare predictions")
    if int(labels.min()) < 0:
        raise ValueError("labels must be class indices ≥ 0")
    c = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    counts = torch.zeros(n, c, dtype=torch.float64, device=labels.device)
    counts.scatter_add_(1, labels.t(), torch.ones(n, b, dtype=torch.float64, device=labels.device))  # [N, C]
    agree_ordered = counts.pow(2).sum(1) - b  # ordered pairs i ≠ j with the same class, per input
    return (1.0 - agree_ordered / (b * (b - 1))).mean().float()


@torch.no_grad()
def prediction_disagreement(spec: NetworkSpec, params: Zoo | Mapping[str, Tensor], x: Tensor, *,
                            chunk: int = 1024) -> Tensor:
    """:func:`mean_pairwise_disagreement` of the top classes of a population on the inputs ``x`` (classification).

    ``params``: ``{name: [B, ...]}`` or a :class:`Zoo` (B ≥ 2); ``x``: ``(N, in)``. Returns a 0-dim tensor.
    """
    out = network_outputs(spec, as_params(params, spec), x, chunk=chunk)
    return mean_pairwise_disagreement(out.argmax(-1), num_classes=out.shape[-1])


@torch.no_grad()
def functional_diversity(
    spec: NetworkSpec,
    params: Zoo | Mapping[str, Tensor],
    x: Tensor,
    kind: str = "classification",
    *,
    chunk: int = 1024,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tensor:
    """Functional diversity of a population on the inputs ``x``.

    ``params``: ``{name: [B, ...]}`` or a :class:`Zoo` (B ≥ 2); ``x``: ``(N, in)``. ``kind="classification"``:
    :func:`mean_pairwise_js` of the softmax outputs (nats); ``kind="regression"``: :func:`mean_pairwise_msd`
    of the outputs. Returns a 0-dim tensor.
    """
    p = as_params(params, spec)
    out = network_outputs(spec, p, x, chunk=chunk)
    if kind == "classification":
        return mean_pairwise_js(torch.softmax(out, dim=-1), max_elements=max_elements)
    if kind == "regression":
        return mean_pairwise_msd(out)
    raise ValueError(f"kind must be 'classification' or 'regression'; got {kind!r}")
