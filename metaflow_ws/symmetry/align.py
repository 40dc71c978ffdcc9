"""Permutation alignment of a batch of networks to a reference network.

Two objectives, both solved with exact linear assignments (:func:`scipy.optimize.linear_sum_assignment`):

- **weight matching** (Git Re-Basin, Ainsworth et al. 2023): maximise ``Σ_l <W_l^ref, P_l W_l P_{l-1}ᵀ> +
  <b_l^ref, P_l b_l>`` by coordinate descent over the hidden layers (random layer order per sweep); each step
  solves one layer's assignment exactly with the others fixed, until a sweep changes nothing or ``max_iter``;
- **activation matching** (data based): per hidden layer, the correlation (or inner product) between the
  reference's and the network's post-activations on a probe batch, then one exact assignment per layer.

Cost matrices for the whole batch come from one batched matmul per layer; only the assignment itself runs per
network (in scipy). Networks that converged drop out of later sweeps. Alignment only permutes neurons, so every
aligned network computes exactly the function of its original.

The reference is one network (unbatched ``{name: [...]}`` or a batch of one, shared by all) or one network per
input network (``{name: [B, ...]}``: align network b to reference b, e.g. the second network of a pair to the
first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import NetworkSpec, Params, activation_fn
from metaflow_ws.symmetry.permutation import (
    Perms,
    apply_permutation,
    check_permutation,
    identity_permutation,
    permute_cols,
    permute_rows,
)

__all__ = [
    "Alignment",
    "activation_matching",
    "align",
    "align_zoo",
    "hidden_activations",
    "solve_assignments",
    "weight_matching",
]

Method = Literal["weight", "activation"]
Similarity = Literal["correlation", "inner"]


@dataclass(frozen=True)
class Alignment:
    """Result of aligning B networks to a reference.

    Attributes:
        perms: one ``[B, n_l]`` int64 tensor per hidden layer (*new neuron i = old neuron perm[i]*);
            ``apply_permutation(spec, original, perms) == params``.
        params: the aligned networks ``{name: [B, ...]}`` (same function as the originals).
        method: ``"weight"`` or ``"activation"``.
        objective: ``[B]`` final matching objective (weight matching: ``Σ <θ_ref, θ_aligned>`` over weights and
            hidden biases; activation matching: summed similarity of the matched neurons).
        iterations: coordinate-descent sweeps run (1 for activation matching).
        converged: ``[B]`` bool, True where the last sweep changed nothing (always True for activation matching).
    """

    perms: Perms
    params: Params
    method: str
    objective: Tensor
    iterations: int
    converged: Tensor


# ------------------------------------------------------------------------------------------------ helpers
def solve_assignments(cost: Tensor, *, maximize: bool = True) -> Tensor:
    """Exact linear assignment of each ``[n, n]`` matrix of ``cost: [B, n, n]``.

    Returns ``perm: [B, n]`` int64 on ``cost``'s device with ``perm[b, i] = j`` the column assigned to row i
    (maximising ``Σ_i cost[b, i, perm[b, i]]`` when ``maximize``).
    """
    from scipy.optimize import linear_sum_assignment

    if cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"cost must be a batch of square matrices (B, n, n); got {tuple(cost.shape)}")
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise ValueError("cost matrices contain NaN or infinite values; check the weights for NaN/inf")
    out = np.empty(c.shape[:2], dtype=np.int64)
    for b in range(c.shape[0]):
        out[b] = linear_sum_assignment(c[b], maximize=maximize)[1]
    return torch.from_numpy(out).to(cost.device)


def _reference_batch(spec: NetworkSpec, reference: Mapping[str, Tensor], batch: int, like: Tensor) -> Params:
    """The reference as ``{name: [1 or B, ...]}`` on ``like``'s device and dtype."""
    try:
        spec.check(reference, batched=False)
        ref = {n: reference[n].unsqueeze(0) for n in spec.shapes}
    except ValueError:
        try:
            rb = spec.batch_size(reference)
        except ValueError as e:
            raise ValueError(f"the reference must be one network of {spec.describe()} (unbatched or a batch of 1) "
                             f"or one per network ({batch}); {e}") from None
        if rb not in (1, batch):
            raise ValueError(f"the reference batch must hold 1 network or one per network ({batch}); got {rb}")
        ref = {n: reference[n] for n in spec.shapes}
    for n, t in ref.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"reference parameter {n!r} contains NaN or infinite values")
    return {n: t.to(like.device, like.dtype) for n, t in ref.items()}


def _check_finite(params: Mapping[str, Tensor]) -> None:
    for n, t in params.items():
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t.reshape(t.shape[0], -1)).all(1)).nonzero().flatten().tolist()
            raise ValueError(f"parameter {n!r} contains NaN or infinite values (networks {bad[:10]}); cannot align")


def _take(t: Tensor, idx: Tensor) -> Tensor:
    """Rows ``idx`` of a batch, or the single shared row of a batch of one."""
    return t if t.shape[0] == 1 else t[idx]


def _assignment_value(cost: Tensor, perm: Tensor) -> Tensor:
    """``Σ_i cost[b, i, perm[b, i]]``: ``[B]``."""
    return cost.gather(2, perm.unsqueeze(-1)).sum((1, 2))


# ------------------------------------------------------------------------------------------ weight matching
def weight_matching(
    spec: NetworkSpec,
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    init: Literal["identity", "forward"] | Sequence[Tensor] = "forward",
    tol: float = 1e-10,
) -> Alignment:
    """Git Re-Basin weight matching of ``params`` to ``reference``.

    Args:
        spec: the architecture.
        params: ``{name: [B, ...]}`` networks to align.
        reference: one network (``{name: [...]}`` or ``[1, ...]``) or one per network (``[B, ...]``).
        max_iter: maximum number of coordinate-descent sweeps over the hidden layers.
        generator: draws the random layer order of every sweep; ``None`` → ``torch.Generator`` seeded 0.
        init: starting point of the coordinate descent: ``"identity"`` (Ainsworth et al.), ``"forward"`` (each
            hidden layer matched on its incoming weights and biases alone, first to last; recovers a permuted copy
            of the reference exactly, where identity starts can stall in a local optimum with ≥ 3 hidden layers),
            or explicit permutations (one ``[B, n_l]`` per hidden layer).
        tol: a layer's new assignment is accepted only if it raises the objective by more than
            ``tol · (1 + |objective|)`` (guarantees termination on ties).

    Returns:
        :class:`Alignment` with the permutations, the aligned networks and the per-network objective.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be ≥ 1; got {max_iter}")
    b = spec.batch_size(params)
    _check_finite(params)
    first = params["layers.0.weight"]
    ref = _reference_batch(spec, reference, b, first)
    hidden = len(spec.hidden_widths)
    if isinstance(init, str):
        if init not in ("identity", "forward"):
            raise ValueError(f"init must be 'identity', 'forward' or a list of permutations; got {init!r}")
        start = identity_permutation(spec, b, device=first.device)
    else:
        start = check_permutation(spec, init, batch=b)
    perms = [p.to(first.device).clone() for p in start]
    g = generator if generator is not None else torch.Generator().manual_seed(0)

    # Costs in float64: assignments of nearly tied neurons must not flip with rounding.
    w = [t.double() for t in spec.weights(params)]
    bias = [t.double() for t in spec.biases(params)]
    rw = [t.double() for t in spec.weights(ref)]
    rb = [t.double() for t in spec.biases(ref)]

    def cost(layer: int, idx: Tensor, outgoing: bool = True) -> Tensor:
        """``[A, n, n]``: similarity of reference neuron i and neuron j of hidden layer ``layer``."""
        wl = w[layer][idx]
        if layer > 0:
            wl = permute_cols(wl, perms[layer - 1][idx])
        c = torch.matmul(_take(rw[layer], idx), wl.transpose(1, 2))
        c = c + _take(rb[layer], idx).unsqueeze(2) * bias[layer][idx].unsqueeze(1)
        if not outgoing:
            return c
        wn = w[layer + 1][idx]
        if layer + 1 < hidden:
            wn = permute_rows(wn, perms[layer + 1][idx])
        return c + torch.matmul(_take(rw[layer + 1], idx).transpose(1, 2), wn)

    active = torch.arange(b, device=first.device)
    if init == "forward":  # match incoming weights and biases layer by layer, then refine
        for layer in range(hidden):
            perms[layer] = solve_assignments(cost(layer, active, outgoing=False))
    sweeps = 0
    for _ in range(max_iter if hidden else 0):
        if active.numel() == 0:
            break
        sweeps += 1
        changed = torch.zeros(active.numel(), dtype=torch.bool, device=first.device)
        for layer in torch.randperm(hidden, generator=g).tolist():
            c = cost(layer, active)
            old = perms[layer][active]
            new = solve_assignments(c)
            v_old, v_new = _assignment_value(c, old), _assignment_value(c, new)
            accept = v_new > v_old + tol * (1.0 + v_old.abs())
            if accept.any():
                perms[layer][active[accept]] = new[accept]
                changed |= accept
        active = active[changed]
    converged = torch.ones(b, dtype=torch.bool, device=first.device)
    converged[active] = False
    aligned = apply_permutation(spec, params, perms)
    objective = sum(
        (ref[n].double() * aligned[n].double()).reshape(b, -1).sum(1)
        for n in spec.shapes
        if n != f"layers.{spec.num_layers - 1}.bias"
    )
    return Alignment(perms=tuple(perms), params=aligned, method="weight", objective=objective.to(first.dtype),
                     iterations=sweeps, converged=converged)


# -------------------------------------------------------------------------------------- activation matching
def hidden_activations(spec: NetworkSpec, params: Mapping[str, Tensor], x: Tensor) -> list[Tensor]:
    """Post-activation outputs of every hidden layer of a batch of networks.

    ``params``: ``{name: [B, ...]}``; ``x``: ``(N, in)`` shared inputs or ``(B, N, in)``. Returns one
    ``[B, N, n_l]`` tensor per hidden layer (batched matmuls, no per-network loop).
    """
    b = spec.batch_size(params)
    if x.dim() not in (2, 3) or x.shape[-1] != spec.in_features or (x.dim() == 3 and x.shape[0] != b):
        raise ValueError(f"probe inputs must be (N, {spec.in_features}) or ({b}, N, {spec.in_features}); "
                         f"got {tuple(x.shape)}")
    act = activation_fn(spec.activation)
    h = x.to(params["layers.0.weight"].device, params["layers.0.weight"].dtype)
    outs = []
    for layer in range(spec.num_layers - 1):
        wt = params[f"layers.{layer}.weight"]
        h = torch.matmul(h, wt.transpose(1, 2)) + params[f"layers.{layer}.bias"].unsqueeze(1)
        h = act(h)
        outs.append(h)
    return outs


def _similarity(ref: Tensor, act: Tensor, kind: str, eps: float) -> Tensor:
    """``ref: [1|B, N, n]``, ``act: [B, N, n]`` → ``[B, n, n]`` correlation or mean inner product."""
    n_probe = act.shape[1]
    if kind == "correlation":
        ref = ref - ref.mean(1, keepdim=True)
        act = act - act.mean(1, keepdim=True)
        ref = ref / (ref.norm(dim=1, keepdim=True) + eps)
        act = act / (act.norm(dim=1, keepdim=True) + eps)
        return torch.matmul(ref.transpose(1, 2), act)
    if kind == "inner":
        return torch.matmul(ref.transpose(1, 2), act) / n_probe
    raise ValueError(f"unknown similarity {kind!r}; expected 'correlation' or 'inner'")


def activation_matching(
    spec: NetworkSpec,
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    probe: Tensor,
    *,
    similarity: Similarity = "correlation",
    chunk: int = 512,
    eps: float = 1e-12,
) -> Alignment:
    """Align ``params`` to ``reference`` by matching hidden activations on ``probe`` inputs.

    Args:
        spec: the architecture.
        params: ``{name: [B, ...]}`` networks to align.
        reference: one network (``{name: [...]}`` or ``[1, ...]``) or one per network (``[B, ...]``).
        probe: ``(N, in)`` inputs (e.g. the task's training inputs).
        similarity: ``"correlation"`` (Pearson correlation over the probe, the Git Re-Basin choice; neurons that
            are constant on the probe correlate 0 with everything) or ``"inner"`` (mean product).
        chunk: networks per batched forward (bounds memory at ``chunk · N · max n_l`` floats).

    Returns:
        :class:`Alignment`; each hidden layer is assigned independently (a neuron's activations do not depend on
        the other layers' permutations).
    """
    if similarity not in ("correlation", "inner"):
        raise ValueError(f"unknown similarity {similarity!r}; expected 'correlation' or 'inner'")
    if chunk < 1:
        raise ValueError(f"chunk must be ≥ 1; got {chunk}")
    b = spec.batch_size(params)
    _check_finite(params)
    first = params["layers.0.weight"]
    ref = _reference_batch(spec, reference, b, first)
    if not isinstance(probe, Tensor) or probe.dim() != 2 or probe.shape[1] != spec.in_features or probe.shape[0] < 2:
        got = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
        raise ValueError(f"probe must be a (N ≥ 2, {spec.in_features}) tensor of inputs; got {got}")
    if not torch.isfinite(probe).all():
        raise ValueError("probe inputs contain NaN or infinite values")
    probe = probe.to(first.device, torch.float64)
    ref64 = {n: t.double() for n, t in ref.items()}
    shared_ref = ref64["layers.0.weight"].shape[0] == 1
    ref_acts = hidden_activations(spec, ref64, probe) if shared_ref else None
    hidden = len(spec.hidden_widths)
    perms: list[list[Tensor]] = [[] for _ in range(hidden)]
    values = []
    for s in range(0, b, chunk):
        idx = torch.arange(s, min(s + chunk, b), device=first.device)
        acts = hidden_activations(spec, {n: t[idx].double() for n, t in params.items()}, probe)
        racts = ref_acts if shared_ref else hidden_activations(spec, {n: t[idx] for n, t in ref64.items()}, probe)
        total = torch.zeros(idx.numel(), dtype=torch.float64, device=first.device)
        for layer in range(hidden):
            c = _similarity(racts[layer], acts[layer], similarity, eps)
            p = solve_assignments(c)
            perms[layer].append(p)
            total = total + _assignment_value(c, p)
        values.append(total)
    cat = tuple(torch.cat(p) for p in perms) if b else identity_permutation(spec, 0, device=first.device)
    objective = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return Alignment(perms=cat, params=apply_permutation(spec, params, cat), method="activation",
                     objective=objective.to(first.dtype), iterations=1,
                     converged=torch.ones(b, dtype=torch.bool, device=first.device))


# -------------------------------------------------------------------------------------------------- facade
def align(
    spec: NetworkSpec,
    params: Mapping[str, Tensor],
    reference: Mapping[str, Tensor],
    *,
    method: Method = "weight",
    probe: Tensor | None = None,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    similarity: Similarity = "correlation",
    init: Literal["identity", "forward"] = "forward",
) -> Alignment:
    """Align ``params: {name: [B, ...]}`` to ``reference`` with ``method`` ``"weight"`` (Git Re-Basin weight
    matching; ``max_iter``, ``generator``, ``init``) or ``"activation"`` (needs ``probe: (N, in)``;
    ``similarity``). See :func:`weight_matching` and :func:`activation_matching`."""
    if method == "weight":
        return weight_matching(spec, params, reference, max_iter=max_iter, generator=generator, init=init)
    if method == "activation":
        if probe is None:
            raise ValueError("activation matching needs probe inputs (N, in); pass probe=")
        return activation_matching(spec, params, reference, probe, similarity=similarity)
    raise ValueError(f"unknown alignment method {method!r}; expected 'weight' or 'activation'")


def _task_probe(zoo: Zoo) -> Tensor:
    from metaflow_ws.tasks.registry import UnknownTaskError, get_task

    try:
        task = get_task(zoo.task)
    except UnknownTaskError as e:
        raise ValueError(f"activation matching needs probe inputs and the zoo's task is not registered ({e}); "
                         "pass probe=") from None
    if task.kind == "synthetic":
        raise ValueError(f"task {task.name!r} is a synthetic weight family without inputs; activation matching "
                         "needs probe=")
    if task.spec != zoo.spec:
        raise ValueError(f"the zoo holds {zoo.spec.describe()} networks but task {task.name!r} uses "
                         f"{task.spec.describe()}; pass probe=")
    return task.data(zoo.data_seed).x_train


def align_zoo(
    zoo: Zoo,
    reference: int | Mapping[str, Tensor] = 0,
    *,
    method: Method = "weight",
    probe: Tensor | None = None,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
    similarity: Similarity = "correlation",
    init: Literal["identity", "forward"] = "forward",
) -> Zoo:
    """Every network of ``zoo`` aligned to one reference: the zoo's checkpoint ``reference`` (an index) or a given
    network (``{name: [...]}``). For ``method="activation"`` the probe defaults to the training inputs of the
    zoo's task. Returns a new :class:`Zoo` (metrics unchanged: alignment preserves every function) whose
    ``info["alignment"]`` records the method, reference and convergence."""
    if isinstance(reference, int) and not isinstance(reference, bool):
        if not -len(zoo) <= reference < len(zoo):
            raise ValueError(f"reference index must lie in [0, {len(zoo)}) for a zoo of {len(zoo)} networks; "
                             f"got {reference}")
        ref = zoo.spec.state_dict_of(zoo.params, reference)
        ref_desc: object = int(reference)
    else:
        ref, ref_desc = reference, "given"
    if method == "activation" and probe is None:
        probe = _task_probe(zoo)
    res = align(zoo.spec, zoo.params, ref, method=method, probe=probe, max_iter=max_iter, generator=generator,
                similarity=similarity, init=init)
    info = dict(zoo.info) | {"alignment": {"method": method, "reference": ref_desc, "sweeps": res.iterations,
                                           "converged": float(res.converged.float().mean()) if len(zoo) else 1.0}}
    return dataclasses.replace(zoo, params=res.params, info=info)
