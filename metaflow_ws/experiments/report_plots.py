"""PNG figures of ``metaflow-ws report`` (matplotlib, Agg backend; each returns the PNG bytes, written atomically
by the caller). Inputs are plain lists/dicts taken from ``results.json``, so the figures can be redrawn from it."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["barrier_plot", "bma_plot", "histogram_plot", "likelihood_plot", "sweep_plot"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def bma_plot(curves: Mapping[str, Mapping[str, Sequence[float]]], title: str,
             reference: float | None = None) -> bytes:
    """Accuracy and NLL of the model average vs ensemble size. ``curves``: ``{label: {"k", "accuracy", "nll"}}``;
    ``reference``: mean accuracy of single trained networks (dashed line)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, c in curves.items():
        ax1.plot(c["k"], c["accuracy"], marker=".", label=label)
        ax2.plot(c["k"], c["nll"], marker=".", label=label)
    if reference is not None:
        ax1.axhline(reference, color="k", ls="--", lw=1, label="trained networks (mean of singles)")
    for ax, name in ((ax1, "test accuracy of the average"), (ax2, "test NLL of the average")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("networks averaged (k)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    return _png(fig)


def sweep_plot(x: Sequence[float], series: Mapping[str, Mapping[str, Sequence[float]]], *, xlabel: str,
               metrics: Sequence[str], title: str, logx: bool = False,
               reference: Mapping[str, float] | None = None) -> bytes:
    """One panel per metric; ``series``: ``{label: {metric: [values per x]}}`` (a series may cover only some of
    the metrics; NaN values leave gaps); ``reference``: ``{metric: value}`` drawn as a dashed line (the trained
    networks)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6))
    axes = [axes] if len(metrics) == 1 else list(axes)
    partial = False
    for ax, metric in zip(axes, metrics):
        for label, s in series.items():
            if metric not in s:
                partial = True
                continue
            ax.plot(x, s[metric], marker="o", label=label)
        if reference and metric in reference:
            ax.axhline(reference[metric], color="k", ls="--", lw=1, label="trained networks")
        if logx and all(v > 0 for v in x):
            ax.set_xscale("log", base=2)
        elif logx and any(v > 0 for v in x):  # a 0 among positive values: linear near 0, log beyond
            ax.set_xscale("symlog", linthresh=min(v for v in x if v > 0))
            ax.set_xlim(left=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes if partial else axes[:1]:  # a series on some panels only: every panel says what it shows
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _png(fig)


def histogram_plot(values: Mapping[str, Sequence[float]], *, xlabel: str, title: str) -> bytes:
    """Overlaid histograms of per-network values (e.g. test accuracy), one per population."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    allv = [v for vs in values.values() for v in vs]
    lo, hi = (min(allv), max(allv)) if allv else (0.0, 1.0)
    bins = 30 if hi > lo else 1
    for label, vs in values.items():
        ax.hist(list(vs), bins=bins, range=(lo, hi) if hi > lo else None, alpha=0.45, density=True, label=label,
                histtype="stepfilled")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return _png(fig)


def barrier_plot(alphas: Sequence[float], curves: Mapping[str, Mapping[str, Sequence[float]]], title: str) -> bytes:
    """Mean ± std test loss along the linear path between pairs. ``curves``: ``{label: {"mean", "std"}}``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, c in curves.items():
        m, s = c["mean"], c["std"]
        ax.plot(alphas, m, marker=".", label=label)
        ax.fill_between(alphas, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.2)
    ax.set_xlabel("α  (θ = (1−α)·θa + α·θb)")
    ax.set_ylabel("test loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _png(fig)


def likelihood_plot(panels: Mapping[str, Mapping[str, Any]], title: str) -> bytes:
    """One panel per flow: histograms of per-network log-likelihood (nats per dimension, negated so that
    higher = more likely is to the right) for each population, AUROCs in the legend.
    ``panels``: ``{flow: {"scores": {population: [values]}, "auroc": {population: value}}}``."""
    plt = _plt()
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 3.8), squeeze=False)
    for ax, (flow, p) in zip(axes[0], panels.items()):
        scores: Mapping[str, Sequence[float]] = p["scores"]
        allv = [v for vs in scores.values() for v in vs]
        lo, hi = (min(allv), max(allv)) if allv else (0.0, 1.0)
        for pop, vs in scores.items():
            a = p["auroc"].get(pop)
            label = pop if a is None else f"{pop} (AUROC {a:.3f})"
            ax.hist(list(vs), bins=25, range=(lo, hi) if hi > lo else None, alpha=0.45, label=label,
                    histtype="stepfilled")
        ax.set_xlabel("log-likelihood per dimension (nats)")
        ax.set_title(flow, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title)
    return _png(fig)
