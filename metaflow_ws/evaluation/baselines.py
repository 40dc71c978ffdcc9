"""Baseline populations to compare generated networks with, built from a training zoo.

Every function returns a :class:`~metaflow_ws.io.Zoo` of the training zoo's architecture, so a baseline goes
through exactly the evaluation a flow's samples go through (:func:`~metaflow_ws.evaluation.full_metrics`,
:func:`~metaflow_ws.evaluation.bma_curve`, :func:`~metaflow_ws.evaluation.functional_diversity`,
:func:`~metaflow_ws.evaluation.novelty`). ``info["baseline"]`` names the recipe and the rest of ``info`` records
how the population was made; ``recipe``, ``seeds`` and ``task_args`` are those of the source zoo.

* :func:`final_checkpoints` — the last checkpoint of every training run (the "target" row of the thesis tables).
* :func:`deep_ensemble` — the same networks meant to be combined by model averaging
  (``info["combine"] == "bma"``; evaluate with :func:`~metaflow_ws.evaluation.ensemble_metrics`).
* :func:`noise_baseline` — final checkpoints plus Gaussian noise ``N(0, σ²I)``, with σ found by bisection on
  ``log σ`` so that the population's functional diversity matches a target (e.g. that of flow samples): does a
  generative model buy more than diversity that noise would give?
* :func:`noise_baseline_matched_accuracy` — the same noise population with σ chosen so that the mean accuracy
  (or MSE) of its networks matches a target: at matched accuracy, is a generator more diverse or more novel?
* :func:`aligned_average_baseline` — averages of random subsets of k aligned final checkpoints (model soups /
  weight averaging after alignment).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from metaflow_ws.evaluation.diversity import functional_diversity
from metaflow_ws.evaluation.novelty import AlignFn
from metaflow_ws.io.zoo import Zoo

__all__ = ["aligned_average_baseline", "deep_ensemble", "final_checkpoints", "noise_baseline",
           "noise_baseline_matched_accuracy"]


def _source_info(zoo: Zoo) -> dict:
    return {"task": zoo.task, "runs": zoo.num_runs, "checkpoints": len(zoo), "source_info": dict(zoo.info)}


def _derived(zoo: Zoo, flat: Tensor, info: dict) -> Zoo:
    """A zoo of new networks ``flat`` ``(S, D)`` (run_id = sample index, step = 0) inheriting the source's
    recipe, seeds and task arguments."""
    return Zoo.from_flat(zoo.task, zoo.spec, flat, recipe=dict(zoo.recipe), seeds=dict(zoo.seeds),
                         task_args=dict(zoo.task_args), info=info)


def final_checkpoints(zoo: Zoo) -> Zoo:
    """The last checkpoint of every run of ``zoo`` (run ids, steps and metrics kept)."""
    fin = zoo.final()
    fin.info = {"baseline": "final_checkpoints", **_source_info(zoo)}
    return fin


def deep_ensemble(zoo: Zoo, size: int | None = None, *, generator: torch.Generator | None = None) -> Zoo:
    """Deep ensemble: the final checkpoints of ``size`` runs (all runs by default; a random subset drawn with
    ``generator`` otherwise), to be combined by averaging their predictive distributions.

    Returns a zoo with ``info["combine"] == "bma"``; its ensemble metrics are
    ``ensemble_metrics(zoo.spec, ens, x, y, kind)``.
    """
    fin = zoo.final()
    runs = len(fin)
    size = runs if size is None else int(size)
    if not 1 <= size <= runs:
        raise ValueError(f"ensemble size must lie in [1, {runs}] (the number of runs); got {size}")
    if size < runs:
        if generator is None:
            raise ValueError("a random ensemble subset needs an explicit torch.Generator (generator=...); got None")
        pick = torch.randperm(runs, generator=generator)[:size].sort().values
        fin = fin.select(pick)
    fin.info = {"baseline": "deep_ensemble", "combine": "bma", "members": fin.run_id.tolist(), **_source_info(zoo)}
    return fin


@torch.no_grad()
def noise_baseline(
    zoo: Zoo,
    x: Tensor,
    target_diversity: float | Zoo | Mapping[str, Tensor],
    *,
    generator: torch.Generator,
    kind: str = "classification",
    num_samples: int | None = None,
    num_centers: int | None = None,
    sigma_bounds: tuple[float, float] = (1e-4, 10.0),
    rtol: float = 1e-2,
    atol: float = 1e-6,
    max_iter: int = 60,
) -> Zoo:
    """Final checkpoints plus isotropic Gaussian weight noise whose scale matches a target functional diversity.

    ``zoo``: training zoo; ``x``: ``(N, in)`` inputs on which diversity is measured; ``target_diversity``: a
    value (nats of mean pairwise JS for classification, mean pairwise squared difference for regression) or a
    population (``{name: [S, ...]}`` / :class:`Zoo`, e.g. flow samples) whose diversity on ``x`` is the target.

    The centres are the final checkpoints of the first ``num_centers`` runs (all by default; ``num_centers=1``
    gives one network plus noise, useful when the target lies below the runs' own diversity); sample ``i`` is
    centre ``i mod num_centers`` plus ``σ·ε_i`` with ``ε ~ N(0, I)`` drawn once from ``generator`` (common random
    numbers), and ``σ`` is found by bisection on ``log σ`` inside ``sigma_bounds`` (the upper bound is grown
    ×10 up to 6 times if needed) until ``|diversity − target| ≤ max(atol, rtol·target)``.

    Returns ``num_samples`` networks (default: the number of centres, at least 2) with ``info``: ``sigma``,
    ``target_diversity``, ``achieved_diversity``, ``iterations``, ``converged``, ``center_runs``.
    Raises ``ValueError`` when the target is outside the reachable range.
    """
    spec = zoo.spec
    fin = zoo.final()
    m = len(fin) if num_centers is None else int(num_centers)
    if not 1 <= m <= len(fin):
        raise ValueError(f"num_centers must lie in [1, {len(fin)}] (the number of runs); got {m}")
    s = max(m, 2) if num_samples is None else int(num_samples)
    if s < 2:
        raise ValueError(f"a population needs at least 2 networks to have a diversity; got num_samples={s}")
    lo, hi = (float(b) for b in sigma_bounds)
    if not 0 < lo < hi:
        raise ValueError(f"sigma_bounds must satisfy 0 < low < high; got {sigma_bounds}")
    if isinstance(target_diversity, (Zoo, Mapping)):
        target_spec = target_diversity.spec if isinstance(target_diversity, Zoo) else spec
        target = float(functional_diversity(target_spec, target_diversity, x, kind))
    else:
        target = float(target_diversity)
    if not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target diversity must be a finite value ≥ 0; got {target}")

    centres = spec.flatten(fin.params)[:m]  # [M, D]
    assign = torch.arange(s) % m
    base = centres[assign.to(centres.device)]  # [S, D]
    eps = torch.randn(s, spec.num_params, generator=generator, dtype=base.dtype).to(base.device)

    def population(sigma: float) -> Tensor:
        return base + sigma * eps

    def diversity(sigma: float) -> float:
        return float(functional_diversity(spec, spec.unflatten(population(sigma)), x, kind))

    tol = max(atol, rtol * target)
    d_lo = diversity(lo)
    evals = [(abs(d_lo - target), lo, d_lo)]
    if d_lo > target + tol:
        raise ValueError(
            f"target diversity {target:.4g} is below the diversity {d_lo:.4g} of {m} centre(s) with noise "
            f"σ={lo:g}; lower num_centers (num_centers=1 perturbs a single network) or sigma_bounds[0]"
        )
    d_hi = diversity(hi)
    evals.append((abs(d_hi - target), hi, d_hi))
    grow = 0
    while d_hi < target - tol and grow < 6:
        lo, d_lo = hi, d_hi
        hi *= 10.0
        d_hi = diversity(hi)
        evals.append((abs(d_hi - target), hi, d_hi))
        grow += 1
    if d_hi < target - tol:
        raise ValueError(
            f"target diversity {target:.4g} is not reachable by weight noise: diversity is {d_hi:.4g} at σ={hi:g}"
        )
    it = 0
    while min(evals)[0] > tol and it < max_iter:
        mid = math.sqrt(lo * hi)
        d_mid = diversity(mid)
        evals.append((abs(d_mid - target), mid, d_mid))
        if d_mid < target:
            lo = mid
        else:
            hi = mid
        it += 1
    err, sigma, achieved = min(evals)
    converged = err <= tol
    if not converged:
        warnings.warn(
            f"noise baseline: bisection stopped after {it} steps at σ={sigma:.4g} with diversity {achieved:.4g} "
            f"(target {target:.4g}, tolerance {tol:.2g}); diversity may not be monotone in σ here",
            RuntimeWarning,
            stacklevel=2,
        )
    info = {
        "baseline": "noise",
        "kind": kind,
        "sigma": sigma,
        "target_diversity": target,
        "achieved_diversity": achieved,
        "tolerance": tol,
        "iterations": it,
        "converged": converged,
        "num_inputs": int(x.shape[0]),
        "center_runs": fin.run_id[:m][assign].tolist(),
        **_source_info(zoo),
    }
    return _derived(zoo, population(sigma), info)


@torch.no_grad()
def noise_baseline_matched_accuracy(
    zoo: Zoo,
    x: Tensor,
    y: Tensor,
    target: float,
    *,
    generator: torch.Generator,
    kind: str = "classification",
    num_samples: int | None = None,
    num_centers: int | None = None,
    sigma_bounds: tuple[float, float] = (1e-4, 10.0),
    atol: float = 2e-3,
    max_iter: int = 40,
) -> Zoo:
    """Final checkpoints plus isotropic Gaussian weight noise whose scale gives a target mean quality.

    ``x: (N, in)``, ``y: (N,)`` labels (or ``(N, out)`` regression targets) on which quality is measured;
    ``target``: mean accuracy (classification) or mean MSE (regression) of the population. Centres, common
    random numbers and ``num_samples`` / ``num_centers`` as in :func:`noise_baseline`; ``σ`` is found by bisection
    on ``log σ`` (quality degrades with σ) until ``|quality − target| ≤ atol``. A target better than the
    centres' own quality cannot be matched: then ``σ = sigma_bounds[0]`` and ``info["converged"]`` is False.
    ``info``: ``sigma``, ``target``, ``achieved``, ``metric``, ``iterations``, ``converged``, ``center_runs``.
    """
    from metaflow_ws.evaluation.metrics import batch_metrics

    if kind not in ("classification", "regression"):
        raise ValueError(f"kind must be 'classification' or 'regression'; got {kind!r}")
    spec = zoo.spec
    fin = zoo.final()
    m = len(fin) if num_centers is None else int(num_centers)
    if not 1 <= m <= len(fin):
        raise ValueError(f"num_centers must lie in [1, {len(fin)}] (the number of runs); got {m}")
    s = m if num_samples is None else int(num_samples)
    if s < 1:
        raise ValueError(f"num_samples must be ≥ 1; got {s}")
    lo, hi = (float(b) for b in sigma_bounds)
    if not 0 < lo < hi:
        raise ValueError(f"sigma_bounds must satisfy 0 < low < high; got {sigma_bounds}")
    if not math.isfinite(target):
        raise ValueError(f"target must be finite; got {target}")
    metric = "accuracy" if kind == "classification" else "mse"
    sign = 1.0 if kind == "classification" else -1.0  # "higher is better" orientation

    centres = spec.flatten(fin.params)[:m]
    assign = torch.arange(s) % m
    base = centres[assign.to(centres.device)]
    eps = torch.randn(s, spec.num_params, generator=generator, dtype=base.dtype).to(base.device)
    x = x.to(base.device, base.dtype)
    y = y.to(base.device, base.dtype) if y.is_floating_point() else y.to(base.device)

    def quality(sigma: float) -> float:
        return float(batch_metrics(spec, spec.unflatten(base + sigma * eps), x, y, kind)[metric].double().mean())

    q_lo = quality(lo)
    evals = [(abs(q_lo - target), lo)]
    it = 0
    if sign * (q_lo - target) < -atol:  # even the smallest noise is worse than the target
        sigma, achieved, converged = lo, q_lo, False
    else:
        q_hi = quality(hi)
        evals.append((abs(q_hi - target), hi))
        grow = 0
        while sign * (q_hi - target) > atol and grow < 6:
            lo, hi = hi, hi * 10.0
            q_hi = quality(hi)
            evals.append((abs(q_hi - target), hi))
            grow += 1
        while min(evals)[0] > atol and it < max_iter:
            mid = math.sqrt(lo * hi)
            q_mid = quality(mid)
            evals.append((abs(q_mid - target), mid))
            if sign * (q_mid - target) > 0:
                lo = mid
            else:
                hi = mid
            it += 1
        err, sigma = min(evals)
        achieved = quality(sigma)
        converged = err <= atol
    info = {
        "baseline": "noise_matched_quality",
        "metric": metric,
        "sigma": sigma,
        "target": float(target),
        "achieved": achieved,
        "iterations": it,
        "converged": converged,
        "center_runs": fin.run_id[:m][assign].tolist(),
        **_source_info(zoo),
    }
    return _derived(zoo, base + sigma * eps, info)


@torch.no_grad()
def aligned_average_baseline(
    zoo: Zoo,
    k: int,
    num_samples: int,
    *,
    align_fn: AlignFn | None,
    generator: torch.Generator | None = None,
) -> Zoo:
    """New networks as averages of ``k`` distinct final checkpoints, after alignment.

    The final checkpoints of all runs are passed through ``align_fn`` (``{name: [M, ...]} -> {name: [M, ...]}``,
    e.g. permutation alignment to a reference network from :mod:`metaflow_ws.symmetry`; ``None`` averages raw
    weights, the unaligned ablation). Each of the ``num_samples`` networks is the mean of the flat weights of a
    random subset of ``k`` of the M aligned networks, drawn without replacement with ``generator`` (required
    unless ``k == M``). ``info["subsets"]`` lists the run ids averaged into each network.
    """
    spec = zoo.spec
    fin = zoo.final()
    m = len(fin)
    k = int(k)
    if not 1 <= k <= m:
        raise ValueError(f"k must lie in [1, {m}] (the number of runs); got {k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1; got {num_samples}")
    params = dict(fin.params)
    if align_fn is not None:
        params = align_fn(params)
        spec.check(params)
        if spec.batch_size(params) != m:
            raise ValueError(f"align_fn must return one network per input network ({m}); got {spec.batch_size(params)}")
    flat = spec.flatten(params)  # [M, D]
    if k == m:
        subsets = torch.arange(m).expand(num_samples, m)
    else:
        if generator is None:
            raise ValueError("random subsets need an explicit torch.Generator (generator=...); got None")
        subsets = torch.rand(num_samples, m, generator=generator).argsort(dim=1)[:, :k]  # [S, k]
    avg = flat[subsets.to(flat.device)].mean(dim=1)  # [S, D]
    info = {
        "baseline": "aligned_average",
        "k": k,
        "aligned": align_fn is not None,
        "align_fn": getattr(align_fn, "__qualname__", repr(align_fn)) if align_fn is not None else None,
        "subsets": fin.run_id[subsets].tolist(),
        **_source_info(zoo),
    }
    return _derived(zoo, avg, info)
