"""Gaussian toy (thesis §4.1, Fig. 4.1): does stochastic sampling recover the spread of the per-network weight
means that deterministic (ODE) sampling loses?

Set-up. The ``gaussian_toy`` task draws target networks with i.i.d. weights ``p1 = N(μ, σ1² I)`` (μ = 1, σ1 = 1)
over a 30-16-16-2 MLP (D = 802 parameters); the flows start from ``p0 = N(0, σ0² I)`` (σ0 = 1,
``FlowConfig.prior_std``). For a batch of N networks ``x: (N, D)`` we compare, with the target:

- the **per-network mean** ``m_i = mean_j x_ij`` — under p1, ``m_i ~ N(μ, σ1²/D)``, so its spread across
  networks (the std of the m_i) is ``σ1/√D`` ≈ 0.0353 — and the **per-network std** ``s_i`` (≈ σ1);
- Wasserstein-1 distances and two-sample Kolmogorov–Smirnov tests between the sampled and a held-out target
  population (with the target-vs-target value as the noise floor at that N).

Methods compared (same sampler code, :func:`metaflow_ws.flows.sample`, Euler steps):

- **analytic flows** (:class:`AnalyticGaussianFlow`): the exact x1-predictor of this Gaussian pair,
  ``E[x1|x_t] = μ + k(t)(x_t − tμ)``, ``k(t) = tσ1²/((1−t)²σ0² + t²σ1²)``, and a *shrunk* predictor whose
  dependence on x_t along the per-network-mean direction is scaled by λ < 1 — an x1-prediction that collapses
  toward the conditional mean, the failure mode the thesis describes. The exact field is the control: its
  deterministic samples are exactly p1 (up to Euler error), so any loss of spread comes from the model;
- **learned Euclidean flows** (Relational Transformer x1-prediction, t ~ Beta(1, 2), no alignment since the
  target weights are exchangeable i.i.d. draws) with independent and mini-batch OT couplings;

each sampled deterministically (ε = 0) and stochastically (noise ε·√dt at every step with t in the noise
window, :class:`metaflow_ws.flows.SampleConfig`) over a sweep of ε.

Run it with ``python -m metaflow_ws.experiments.gaussian_toy --out results/gaussian_toy [--quick]``; the report
command calls :func:`run_gaussian_toy`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metaflow_ws.flows import FlowConfig, SampleConfig, TrainConfig, WeightFlow, sample, train_flow
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from metaflow_ws.tasks.registry import get_task
from metaflow_ws.train import train_population

__all__ = [
    "FULL",
    "QUICK",
    "AnalyticGaussianFlow",
    "NetworkStats",
    "ToyConfig",
    "compare_populations",
    "ks_two_sample",
    "main",
    "network_stats",
    "predictor_gain",
    "run_gaussian_toy",
    "spread",
    "spread_standard_error",
    "target_spread",
    "wasserstein1",
    "write_outputs",
]

TASK = "gaussian_toy"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class NetworkStats:
    """Per-network statistics of a population ``x: (N, D)``: ``means: (N,)`` and ``stds: (N,)`` (ddof = 1)."""

    means: np.ndarray
    stds: np.ndarray


def network_stats(x: Tensor) -> NetworkStats:
    """Mean and std over the D weights of each of the N networks in ``x: (N, D)`` (computed in float64)."""
    if x.dim() != 2 or x.shape[1] < 2:
        raise ValueError(f"expected a (N, D) population with D ≥ 2; got {tuple(x.shape)}")
    x64 = x.detach().to("cpu", torch.float64)
    return NetworkStats(means=x64.mean(1).numpy(), stds=x64.std(1, correction=1).numpy())


def spread(values: np.ndarray | Sequence[float]) -> float:
    """Sample standard deviation (ddof = 1) of a 1-D set of values, e.g. the per-network means."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"spread needs a 1-D array of ≥ 2 values; got shape {v.shape}")
    return float(v.std(ddof=1))


def target_spread(dim: int, std: float = 1.0) -> float:
    """Std of the per-network mean of ``dim`` i.i.d. N(μ, std²) weights: ``std / √dim``."""
    if dim < 1:
        raise ValueError(f"dim must be ≥ 1; got {dim}")
    return float(std) / math.sqrt(dim)


def spread_standard_error(sigma: float, n: int) -> float:
    """Standard error of the sample std of ``n`` normal draws with std ``sigma``: ``σ / √(2(n − 1))``
    (large-n approximation; the tolerance tests and the README use)."""
    if n < 2:
        raise ValueError(f"n must be ≥ 2; got {n}")
    return float(sigma) / math.sqrt(2 * (n - 1))


def wasserstein1(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Exact Wasserstein-1 distance between the empirical distributions of two 1-D samples:
    ``∫ |F_a(z) − F_b(z)| dz`` over the merged support (any sizes)."""
    a = np.sort(np.asarray(a, dtype=np.float64).ravel())
    b = np.sort(np.asarray(b, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("wasserstein1 needs two non-empty samples")
    z = np.concatenate([a, b])
    z.sort(kind="mergesort")
    widths = np.diff(z)
    fa = np.searchsorted(a, z[:-1], side="right") / a.size
    fb = np.searchsorted(b, z[:-1], side="right") / b.size
    return float(np.sum(np.abs(fa - fb) * widths))


def ks_two_sample(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test: ``(statistic, p-value)`` (scipy's exact/asymptotic choice)."""
    from scipy.stats import ks_2samp

    res = ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return float(res.statistic), float(res.pvalue)


def compare_populations(x: Tensor, reference: Tensor, *, target_std: float = 1.0) -> dict[str, float]:
    """Per-network statistics of ``x: (N, D)`` against a held-out target population ``reference: (M, D)``.

    Returns the mean and spread of the per-network means (and the spread relative to ``target_std/√D``), the
    mean per-network std, W1 and KS (statistic, p) of the per-network means, of the per-network means each
    centred on its population's average (spread and shape without the location), and of the per-network stds.
    """
    if x.shape[1] != reference.shape[1]:
        raise ValueError(f"populations of different dimension: {tuple(x.shape)} vs {tuple(reference.shape)}")
    s, r = network_stats(x), network_stats(reference)
    ideal = target_spread(x.shape[1], target_std)
    ks_m, p_m = ks_two_sample(s.means, r.means)
    cm, cr = s.means - s.means.mean(), r.means - r.means.mean()  # shape and spread only, location removed
    ks_c, p_c = ks_two_sample(cm, cr)
    ks_s, p_s = ks_two_sample(s.stds, r.stds)
    return {
        "n": int(x.shape[0]),
        "mean_of_means": float(s.means.mean()),
        "spread_of_means": spread(s.means),
        "spread_ratio": spread(s.means) / ideal,
        "std_mean": float(s.stds.mean()),
        "coordinate_std": float(x.detach().double().std(0).mean()),
        "w1_means": wasserstein1(s.means, r.means),
        "ks_means": ks_m,
        "ks_means_p": p_m,
        "w1_means_centered": wasserstein1(cm, cr),
        "ks_means_centered": ks_c,
        "ks_means_centered_p": p_c,
        "w1_stds": wasserstein1(s.stds, r.stds),
        "ks_stds": ks_s,
        "ks_stds_p": p_s,
    }


def predictor_gain(flow: WeightFlow, t: float, x0: Tensor, x1: Tensor, *, target_mean: float,
                   target_std: float, prior_std: float) -> dict[str, float]:
    """How a flow's x1-prediction at time ``t`` depends on x_t, relative to the exact posterior mean.

    With ``y = x_t − tμ`` on the path ``x_t = (1 − t) x0 + t x1`` (``x0, x1: (N, D)``), the exact predictor is
    ``μ + k(t) y``. Returns the least-squares slope of the predicted per-network mean on the input per-network
    mean, divided by ``k(t)`` (``mean_gain``: 1 exact, < 1 collapsed toward the mean of p1 along that direction),
    the same ratio for the directions orthogonal to it (``other_gain``), and the intercept of that regression
    minus μ (``mean_bias``: the offset of the predicted per-network mean at y = 0, in weight units; compare
    with ``target_std/√D``).
    """
    if x0.shape != x1.shape or x0.dim() != 2:
        raise ValueError(f"x0 and x1 must be equal (N, D) batches; got {tuple(x0.shape)} and {tuple(x1.shape)}")
    k = t * target_std**2 / ((1 - t) ** 2 * prior_std**2 + t**2 * target_std**2)
    p = next(flow.parameters())
    xt = ((1 - t) * x0 + t * x1).to(p)
    with torch.no_grad():
        pred = flow.predict_x1(xt, torch.full((xt.shape[0],), float(t), dtype=p.dtype, device=p.device))
    y, pred = (xt - t * target_mean).double().cpu(), pred.double().cpu()
    m_in, m_out = y.mean(1), pred.mean(1)
    dm = m_in - m_in.mean()
    slope_m = float((dm * (m_out - m_out.mean())).sum() / (dm * dm).sum())
    r_in, r_out = y - y.mean(1, keepdim=True), pred - pred.mean(1, keepdim=True)
    slope_r = float((r_in * r_out).sum() / (r_in * r_in).sum())
    return {"t": float(t), "k": float(k), "mean_gain": slope_m / k, "other_gain": slope_r / k,
            "mean_bias": float(m_out.mean() - slope_m * m_in.mean()) - target_mean}


# -------------------------------------------------------------------------------------------- analytic flow
class AnalyticGaussianFlow(WeightFlow):
    """A Euclidean :class:`WeightFlow` whose x1-prediction is the closed-form posterior mean of the Gaussian pair
    ``p0 = N(0, σ0² I)``, ``p1 = N(μ, σ1² I)`` under independent coupling and the linear path:

    ``E[x1 | x_t] = μ + k(t) (x_t − tμ)``, ``k(t) = t σ1² / ((1 − t)² σ0² + t² σ1²)``.

    ``mean_shrink = λ`` scales, for ``t < shrink_until``, the dependence on x_t of the component along the
    per-network-mean direction (the all-ones direction) by λ: λ = 1 is exact, λ = 0 predicts the per-network
    mean μ for every sample whatever x_t (the x1-prediction collapsed to the mean of p1 in that direction, which
    is what an MSE-trained predictor drifts to where the signal is weak: at small t, where ``k(t)`` is small, and
    along a direction that carries 1/D of the loss). The other directions, and all times ``t ≥ shrink_until``,
    stay exact. The Relational Transformer that :class:`WeightFlow` builds is unused; sampling goes through the
    library's :func:`~metaflow_ws.flows.sample` unchanged.
    """

    def __init__(self, config: FlowConfig, *, target_mean: float, target_std: float,
                 mean_shrink: float = 1.0, shrink_until: float = 1.0) -> None:
        if config.flow != "euclidean":
            raise ValueError(f"the analytic Gaussian flow is Euclidean; got flow={config.flow!r}")
        if target_std <= 0 or config.prior_std <= 0:
            raise ValueError("target_std and prior_std must be > 0")
        super().__init__(config)
        self.target_mean = float(target_mean)
        self.target_std = float(target_std)
        self.mean_shrink = float(mean_shrink)
        self.shrink_until = float(shrink_until)

    def gain(self, t: Tensor) -> Tensor:
        """``k(t)`` for ``t: (B,)`` → ``(B, 1)``."""
        s0, s1 = self.config.prior_std ** 2, self.target_std ** 2
        t = t.reshape(-1, 1)
        return t * s1 / ((1 - t) ** 2 * s0 + t ** 2 * s1)

    def predict_x1(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"flow coordinates must be (B, {self.dim}); got {tuple(x.shape)}")
        t = t.reshape(-1, 1).to(x)
        y = x - t * self.target_mean
        if self.mean_shrink != 1.0:
            m = y.mean(1, keepdim=True)
            lam = torch.where(t < self.shrink_until, torch.full_like(t, self.mean_shrink), torch.ones_like(t))
            y = (y - m) + lam * m
        return self.target_mean + self.gain(t) * y


# ----------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class ToyConfig:
    """Sizes of one run (see :data:`QUICK` and :data:`FULL`)."""

    train_networks: int = 1000
    samples: int = 300
    sample_steps: int = 32
    train_steps: int = 1200
    couplings: tuple[str, ...] = ("independent", "ot")
    d_model: int = 32
    num_layers: int = 3
    batch_size: int = 32
    noises: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    noise_window: tuple[float, float] = (0.5, 1.0)
    #: analytic flows as (λ, t_until): the mean-direction gain is λ·k(t) for t < t_until (1.0, 1.0 = exact)
    analytic: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.9, 1.0), (0.0, 0.8))
    short_train_steps: int = 300  # > 0: also train a short-trained flow (independent coupling) for this many steps
    gain_times: tuple[float, ...] = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.97)


QUICK = ToyConfig(train_networks=64, samples=48, sample_steps=8, train_steps=20, couplings=("independent",),
                  d_model=8, num_layers=1, batch_size=16, noises=(0.0, 1.0), gain_times=(0.2, 0.9), short_train_steps=0)
FULL = ToyConfig()


def _command(out_dir: Path, quick: bool, seed: int, device: Any) -> str:
    parts = ["python", "-m", "metaflow_ws.experiments.gaussian_toy", "--out", str(out_dir)]
    if quick:
        parts.append("--quick")
    if seed != 0:
        parts += ["--seed", str(seed)]
    if device is not None and str(device) != "cpu":
        parts += ["--device", str(device)]
    return "OMP_NUM_THREADS=1 " + shlex.join(parts)


def _sample_sweep(flow: WeightFlow, cfg: ToyConfig, reference: Tensor, target_std: float, seed: int,
                  method: str, extra: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[float, np.ndarray]]:
    """Sample ``flow`` at every ε of the sweep from the same prior draws; one row per ε."""
    rows, means = [], {}
    x0 = flow.sample_prior(cfg.samples, generator=torch.Generator().manual_seed(seed + 7))
    for eps in cfg.noises:
        # the thesis's uniform time grid: the spread this reproduction measures is that of the plain Euler ODE
        sc = SampleConfig(steps=cfg.sample_steps, rho=1.0, noise=float(eps), noise_window=cfg.noise_window)
        t0 = time.perf_counter()
        x = sample(flow, cfg.samples, sc, x0=x0, generator=torch.Generator().manual_seed(seed + 11))
        secs = time.perf_counter() - t0
        stats = compare_populations(x, reference, target_std=target_std)
        log.info("  %s, ε=%g: spread ratio %.3f, per-net std %.3f (%.0f s)", method, eps, stats["spread_ratio"],
                 stats["std_mean"], secs)
        means[float(eps)] = network_stats(x).means
        rows.append({"method": method, "noise": float(eps),
                     "noise_window": list(cfg.noise_window) if eps > 0 else None,
                     "sample_seconds": round(secs, 2), **extra, **stats})
    return rows, means


def run_gaussian_toy(out_dir: Path, *, quick: bool, seed: int = 0, device=None) -> dict:
    """Run the Gaussian-toy reproduction and write its PNG figures into ``out_dir``.

    Returns ``{"markdown": str, "figures": [Path, ...], "results": dict}`` (``results`` is JSON-able);
    :func:`write_outputs` writes ``README.md`` and ``results.json`` from it.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = QUICK if quick else FULL
    device = torch.device(device) if device is not None else torch.device("cpu")
    task = get_task(TASK)
    syn = task.synthetic
    if syn is None:
        raise ValueError(f"task {TASK!r} has no [synthetic] table")
    spec = task.spec
    dim = spec.num_params
    mu, s1, s0 = float(syn.target_mean), float(syn.target_std), float(syn.prior_std)

    zoo = train_population(task, cfg.train_networks, seed=seed)
    reference = train_population(task, cfg.samples, seed=seed + 1_000_003).flat().to(torch.float64)
    fresh = train_population(task, cfg.samples, seed=seed + 2_000_003).flat().to(torch.float64)
    train_flat = zoo.flat().to(torch.float64)

    rows: list[dict[str, Any]] = []
    hist_means: dict[str, dict[float, np.ndarray]] = {}
    rows.append({"method": "target: held-out draws of p1 (noise floor)", "noise": None, "noise_window": None,
                 **compare_populations(fresh, reference, target_std=s1)})
    rows.append({"method": "target: training draws of p1", "noise": None, "noise_window": None,
                 **compare_populations(train_flat[: cfg.samples], reference, target_std=s1)})
    # the same prior draws as WeightFlow.sample_prior in _sample_sweep (float32 randn from the same seed)
    x0 = torch.randn(cfg.samples, dim, generator=torch.Generator().manual_seed(seed + 7)).double() * s0
    rows.append({"method": "prior draws x0 shifted by μ (start of every sampled row)", "noise": None,
                 "noise_window": None, **compare_populations(x0 * (s1 / s0) + mu, reference, target_std=s1)})

    # plain flow matching (sigma=0): the experiment compares the learned field with the exact one of that objective
    base = FlowConfig(flow="euclidean", widths=spec.widths, activation=spec.activation, task=TASK, prior_std=s0,
                      d_model=cfg.d_model, num_layers=cfg.num_layers, sigma=0.0)
    gx0 = torch.randn(cfg.samples, dim, generator=torch.Generator().manual_seed(seed + 13)) * s0
    gx1 = fresh.float()
    gains: list[dict[str, Any]] = []

    def add_gains(name: str, flow: WeightFlow) -> None:
        for t in cfg.gain_times:
            gains.append({"method": name, **predictor_gain(flow, t, gx0, gx1, target_mean=mu, target_std=s1,
                                                           prior_std=s0)})

    for lam, until in cfg.analytic:
        flow = AnalyticGaussianFlow(base, target_mean=mu, target_std=s1, mean_shrink=lam, shrink_until=until)
        flow = flow.to(device)
        if lam == 1.0:
            name = "analytic: exact E[x1|x_t]"
        else:
            name = f"analytic: mean-direction gain ×{lam:g}" + (f" for t < {until:g}" if until < 1 else "")
        r, m = _sample_sweep(flow, cfg, reference, s1, seed, name,
                             {"kind": "analytic", "mean_shrink": lam, "shrink_until": until})
        rows += r
        hist_means[name] = m

    trained: list[tuple[str, int]] = [(c, cfg.train_steps) for c in cfg.couplings]
    if cfg.short_train_steps > 0:
        trained.append(("independent", cfg.short_train_steps))
    flows_info = []
    for coupling, steps in trained:
        tc = TrainConfig(steps=steps, batch_size=cfg.batch_size, coupling=coupling, align=False, seed=seed,
                         warmup=min(100, max(1, steps // 10)), checkpoint_every=10**9)
        log.info("training %s coupling, %d steps ...", coupling, steps)
        res = train_flow(zoo, base, tc, device=device)
        log.info("  trained in %.0f s (final loss %.4f)", res.seconds, res.final_loss)
        name = f"learned: Euclidean, {coupling} coupling, {steps} steps"
        info = {"kind": "learned", "coupling": coupling, "train_steps": steps,
                "train_seconds": round(res.seconds, 1), "final_loss": res.final_loss}
        flows_info.append({"method": name, **info})
        r, m = _sample_sweep(res.flow, cfg, reference, s1, seed, name, info)
        rows += r
        hist_means[name] = m
        add_gains(name, res.flow)

    figures = _figures(out_dir, rows, hist_means, reference, dim, mu, s1, cfg)
    wall = time.perf_counter() - t_start
    results = {
        "task": TASK,
        "quick": quick,
        "seed": seed,
        "command": _command(out_dir, quick, seed, device),
        "wall_seconds": round(wall, 1),
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "architecture": list(spec.widths),
        "dim": dim,
        "target": {"mean": mu, "std": s1, "prior_std": s0, "spread_of_means": target_spread(dim, s1),
                   "spread_standard_error": spread_standard_error(target_spread(dim, s1), cfg.samples)},
        "config": dataclasses.asdict(cfg),
        "flows": flows_info,
        "rows": rows,
        "predictor_gains": gains,
        "figures": [p.name for p in figures],
    }
    return {"markdown": _markdown(results), "figures": figures, "results": results}


# ------------------------------------------------------------------------------------------------ outputs
def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) >= 10 ** (-nd) or v == 0 else f"{v:.1e}"
    return str(v)


def _markdown(res: dict[str, Any]) -> str:
    tgt = res["target"]
    cfg = res["config"]
    lines = [
        "## Gaussian toy: deterministic vs stochastic sampling (thesis §4.1, Fig. 4.1)",
        "",
        f"p0 = N(0, {tgt['prior_std']:g}²I) → p1 = N({tgt['mean']:g}, {tgt['std']:g}²I) over the {res['dim']} "
        f"weights of a {'-'.join(map(str, res['architecture']))} MLP. Per-network mean of p1 ~ "
        f"N({tgt['mean']:g}, 1/D): target spread 1/√D = {tgt['spread_of_means']:.4f} "
        f"(± {tgt['spread_standard_error']:.4f} sampling s.e. at N = {cfg['samples']}). "
        f"Flows trained on {cfg['train_networks']} draws; {cfg['samples']} samples per row, "
        f"{cfg['sample_steps']} Euler steps, the same prior draws in every row; noise ε·√dt per step for t in "
        f"[{cfg['noise_window'][0]:g}, {cfg['noise_window'][1]:g}). W1/KS against {cfg['samples']} held-out "
        "target draws.",
        "",
        "| method | ε | mean of means | spread of means (× 1/√D) | per-net std | W1 means | KS p means "
        "| W1 centred means | KS p centred | W1 stds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {_fmt(r['noise'], 2)} | {r['mean_of_means']:.4f} | "
            f"{r['spread_of_means']:.4f} ({r['spread_ratio']:.2f}) | {r['std_mean']:.3f} | {r['w1_means']:.4f} | "
            f"{_fmt(r['ks_means_p'], 3)} | {r['w1_means_centered']:.4f} | {_fmt(r['ks_means_centered_p'], 3)} | "
            f"{r['w1_stds']:.4f} |")
    gains = res.get("predictor_gains") or []
    if gains:
        ts = sorted({g["t"] for g in gains})
        lines += ["", "x1-prediction of the learned flows along the per-network-mean direction: least-squares gain "
                  "relative to the exact posterior mean (1 = exact, < 1 = pulled toward the mean of p1) and the "
                  f"offset of the predicted per-network mean (target spread {tgt['spread_of_means']:.4f}); other "
                  "directions in results.json (`other_gain`). The reference is the independent-coupling posterior "
                  "mean, so OT rows at small t measure the coupling's different conditional mean, not a collapse.",
                  "",
                  "| flow | " + " | ".join(f"t={t:g}" for t in ts) + " |", "|---|" + "---|" * len(ts)]
        for name in dict.fromkeys(g["method"] for g in gains):
            by_t = {g["t"]: g for g in gains if g["method"] == name}
            lines.append(f"| {name} | " + " | ".join(
                f"{by_t[t]['mean_gain']:.3f} ({by_t[t]['mean_bias']:+.4f})" for t in ts) + " |")
    lines += _findings(res)
    lines += ["", *(f"![{p}]({p})" for p in res["figures"]), "",
              f"Command: `{res['command']}` (seed {res['seed']}, {res['wall_seconds']:.0f} s wall on "
              f"{res['device']}, {res['threads']} thread(s), torch {res['torch']})."]
    return "\n".join(lines) + "\n"


def _findings(res: dict[str, Any]) -> list[str]:
    """A few sentences read off the rows (empty when a row they need is missing)."""
    rows, sd, mu = res["rows"], res["target"]["spread_of_means"], res["target"]["mean"]

    def det(method: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["method"] == method and r["noise"] == 0.0), None)

    prior = next((r for r in rows if r["method"].startswith("prior draws")), None)
    exact = det("analytic: exact E[x1|x_t]")
    learned = [m for m in dict.fromkeys(r["method"] for r in rows) if m.startswith("learned")]
    if prior is None or exact is None or not learned:
        return []
    k = res["config"]["sample_steps"]
    out = ["", "**Findings** (read off the rows above):", "",
           f"- Exact field: deterministic samples keep the spread of the prior draws they start from "
           f"(×{exact['spread_ratio']:.2f} vs ×{prior['spread_ratio']:.2f}); {k} Euler steps shrink every direction "
           f"alike (per-network std {exact['std_mean']:.3f}). The sampler loses nothing beyond Euler error."]
    for m in learned:
        d = det(m)
        sweep = [r for r in rows if r["method"] == m and r["noise"]]
        if d is None or not sweep:
            continue
        best = min(sweep, key=lambda r: abs(r["spread_ratio"] - 1))
        off = d["mean_of_means"] - mu
        p_raw = max(r["ks_means_p"] for r in rows if r["method"] == m)
        p_c = min(r["ks_means_centered_p"] for r in rows if r["method"] == m and r["noise"] in (0.0, best["noise"]))
        out.append(
            f"- {m}: deterministic ×{d['spread_ratio']:.2f} (×{d['spread_ratio'] / exact['spread_ratio']:.2f} of "
            f"the exact field's from the same x0); ε = {best['noise']:g} gives ×{best['spread_ratio']:.2f} "
            f"at per-network std {best['std_mean']:.3f} (noise widens every direction, not only the lost one). "
            f"Mean weight offset {off:+.4f} = {off / sd:+.1f}/√D at every ε: KS on raw means p ≤ {p_raw:.1e}, "
            f"on centred means p ≥ {p_c:.2f}.")
    main_flow = next((m for m in learned if "independent" in m), learned[0])
    gains = [g for g in res.get("predictor_gains", []) if g["method"] == main_flow]
    mid = [g["mean_gain"] for g in gains if 0.2 <= g["t"] < 0.95]
    other = [g["other_gain"] for g in gains if 0.2 <= g["t"] < 0.95]
    late = [g for g in gains if g["t"] >= 0.95]
    if mid and late:
        out.append(
            f"- Why ({main_flow.split(': ', 1)[1]}): the x1-prediction's gain along the mean direction is "
            f"{min(mid):.2f}–{max(mid):.2f} of the exact one for 0.2 ≤ t < 0.95 (pulled toward the mean of p1; "
            f"other directions {min(other):.2f}–{max(other):.2f}), and the 1/(1 − t) in the velocity "
            f"compounds that shrinkage; the "
            f"offset comes from the prediction near t = 1 ({late[-1]['mean_bias']:+.4f} at t = {late[-1]['t']:g}), "
            f"which the last Euler step returns as the sample.")
    collapsed = [m for m in dict.fromkeys(r["method"] for r in rows if r.get("mean_shrink") == 0.0)]
    if collapsed:
        c = [r for r in rows if r["method"] == collapsed[0]]
        top = max(c, key=lambda r: r["noise"] or 0.0)
        out.append(
            f"- The thesis's strong collapse appears when the prediction ignores the per-network mean of x_t "
            f"early ({collapsed[0].split(': ', 1)[1]}): ×{c[0]['spread_ratio']:.2f} deterministically, "
            f"×{top['spread_ratio']:.2f} with ε = {top['noise']:g}.")
    return out


def _savefig(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _figures(out_dir: Path, rows: list[dict[str, Any]], hist_means: dict[str, dict[float, np.ndarray]],
             reference: Tensor, dim: int, mu: float, s1: float, cfg: ToyConfig) -> list[Path]:
    from matplotlib.figure import Figure

    ref_means = network_stats(reference).means
    sd = target_spread(dim, s1)
    eps_max = max(cfg.noises)
    eps_mid = sorted(cfg.noises)[len(cfg.noises) // 2]
    names = list(hist_means)
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes, names):
        allv = np.concatenate([ref_means, *hist_means[name].values()])
        lo, hi = np.quantile(allv, [0.002, 0.998])
        lo, hi = min(lo, mu - 4 * sd), max(hi, mu + 4 * sd)
        bins = np.linspace(lo, hi, 40)
        ax.hist(ref_means, bins=bins, density=True, alpha=0.35, color="k", label="target p1")
        for eps, color in dict.fromkeys(((0.0, "C0"), (eps_mid, "C1"), (eps_max, "C3"))):
            if eps == eps_mid and eps_mid == eps_max and color == "C1":
                continue
            if eps in hist_means[name]:
                ax.hist(hist_means[name][eps], bins=bins, density=True, histtype="step", lw=1.6, color=color,
                        label="deterministic" if eps == 0 else f"stochastic ε={eps:g}")
        z = np.linspace(lo, hi, 300)
        ax.plot(z, np.exp(-0.5 * ((z - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)), "k--", lw=1,
                label="N(μ, 1/D)")
        ax.set_title(name.replace(", ", ",\n", 1), fontsize=8)
        ax.set_xlabel("per-network mean weight")
    for ax in axes[::ncols]:
        ax.set_ylabel("density")
    axes[0].legend(fontsize=7)
    fig.suptitle("Per-network mean of sampled weights (thesis Fig. 4.1)", fontsize=10)
    p1 = _savefig(fig, out_dir / "means_histograms.png")

    fig = Figure(figsize=(9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for i, name in enumerate(names):
        rs = [r for r in rows if r["method"] == name]
        e = [r["noise"] for r in rs]
        ax1.plot(e, [r["spread_ratio"] for r in rs], "o-", color=f"C{i}", label=name, ms=4)
        ax2.plot(e, [r["std_mean"] for r in rs], "o-", color=f"C{i}", ms=4)
    ax1.axhline(1.0, color="k", ls="--", lw=1)
    ax2.axhline(s1, color="k", ls="--", lw=1)
    ax1.set_xlabel("noise ε")
    ax2.set_xlabel("noise ε")
    ax1.set_ylabel("spread of per-network means × √D")
    ax2.set_ylabel("mean per-network std")
    ax1.legend(fontsize=6)
    fig.suptitle(f"Stochastic sampling sweep (noise window [{cfg.noise_window[0]:g}, {cfg.noise_window[1]:g}))",
                 fontsize=10)
    p2 = _savefig(fig, out_dir / "noise_sweep.png")
    return [p1, p2]


def write_outputs(out_dir: Path, result: dict[str, Any]) -> list[Path]:
    """Write ``README.md`` and ``results.json`` of a :func:`run_gaussian_toy` result atomically into ``out_dir``
    (the figures are already there)."""
    out_dir = Path(out_dir)
    readme = atomic_write_text(out_dir / "README.md", "# gaussian_toy\n\n" + result["markdown"])
    js = atomic_write_json(out_dir / "results.json", json.loads(json.dumps(result["results"], allow_nan=True)))
    return [readme, js]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaflow_ws.experiments.gaussian_toy",
                                description="Gaussian toy: deterministic vs stochastic sampling (thesis Fig. 4.1)")
    p.add_argument("--out", required=True, help="folder for README.md, results.json and the PNG figures")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for tests and smoke runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = p.parse_args(argv)
    from metaflow_ws.errors import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    result = run_gaussian_toy(out, quick=args.quick, seed=args.seed, device=device)
    paths = write_outputs(out, result)
    print(f"wrote {', '.join(str(q) for q in [*paths, *result['figures']])} "
          f"({result['results']['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
