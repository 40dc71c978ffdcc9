"""Transfer experiments behind ``metaflow-ws transfer``: what flows over weights buy on new tasks and widths.

(a) **Task transfer by guidance.** A flow trained on a source zoo (``digits``; ``mnist1d``; ``mnist`` when the
    user gives a folder with the MNIST and Fashion-MNIST files) is sampled with the loss gradients of a related
    target task (``digits_permuted``; ``mnist1d`` with shuffled positions; ``fashion_mnist``), sweeping the
    guidance strength λ × the number of sampling steps × where the gradient is taken (at x_t, the thesis's
    form, or at the flow's prediction x̂1: ``SampleConfig.guidance_at``); next to it the networks trained on the
    target (its recipe and Adam) and a *guidance-only* baseline: the same number of guidance steps from the same
    prior draws with the flow's velocity switched off (Riemannian gradient descent).
(b) **Learned initialization.** Training on the held-out target task from flow samples (unguided, guided, best
    of k candidates, rebalanced or not, plus the optimizer state :func:`metaflow_ws.init.warm_start` sets: Adam
    moments, SGD momentum) vs PyTorch's default init and N(0, σ²), several seeds, test accuracy vs steps and
    steps-to-threshold ratios, with Adam and with the task's SGD recipe. All runs of one optimizer train at once
    with ``vmap``.
(c) **Architecture transfer.** The ``digits`` flow (64-10-10) samples other hidden widths through
    :meth:`WeightFlow.for_spec`, with and without guidance, next to networks trained at those widths.

Every guided cell uses the same prior draws (one generator seed), so cells differ only in the sampler. Sweep
choices for (b) are made on the validation split, never on the test split.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaflow_ws.evaluation.metrics import batch_metrics
from metaflow_ws.flows import FlowConfig, SampleConfig, TrainConfig, WeightFlow, sample, train_flow
from metaflow_ws.flows.flow import check_path_noise
from metaflow_ws.flows.sampling import guidance_gradient
from metaflow_ws.flows.train import check_lr, saved_flow_matches
from metaflow_ws.init import Support, balance_scales, candidate_gradients
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from metaflow_ws.nets.growth import can_grow
from metaflow_ws.nets.spec import NetworkSpec, Params
from metaflow_ws.tasks.registry import Task, get_task
from metaflow_ws.train.optim import SGD, Adam
from metaflow_ws.train.population import fit_population, steps_per_epoch, train_population

__all__ = ["PRESETS", "TransferConfig", "architecture_plot", "architecture_table", "architecture_transfer", "run_transfer",
           "write_results"]

PRESETS = ("tiny", "quick", "full")


@dataclass(frozen=True)
class TransferConfig:
    """Budgets of the three experiments (``preset`` names the defaults they came from)."""

    preset: str = "full"
    seed: int = 0
    flow: str = "geometric"
    #: coupling of flow training (``TrainConfig.coupling``); the zoo is aligned first
    coupling: str = "ot-perm"
    d_model: int = 32
    num_layers: int = 3
    #: path noise of the source flows' training (``FlowConfig.sigma``, ``train --path-noise``). 0 here, unlike
    #: ``train``'s default SIGMA: a path-noise flow pulls every point back onto its source task's paths, which
    #: fights the target task's guidance. digits → digits_permuted (d=64 × 5, 32 samples, λ=10, 128 steps, ∇ at
    #: x̂1): 0.591 at σ = 0.3 vs 0.815 at σ = 0; at x_t 0.265 vs 0.773
    path_noise: float = 0.0
    #: peak learning rate of the source flows' training (``TrainConfig.lr``, the library's default 1e-2). Against
    #: 2e-3 (d=64 × 5, `results/transfer`): digits → permuted digits 0.925 vs 0.922 at x̂1, 0.915 vs 0.872 at x_t;
    #: mnist1d → shuffled 0.370 vs 0.373; guided SGD inits start at 0.949 vs 0.936 (ratio 0.29 vs 0.42)
    flow_lr: float = TrainConfig.lr
    #: train the source flows under ``torch.compile`` (``TrainConfig.compile``)
    compile: bool = False
    #: precision of the field while training the source flows (``TrainConfig.precision``)
    precision: str = "fp32"
    #: load the source flows saved in ``OUT/flows/`` by an earlier run when their configuration, training
    #: settings and zoo match (``saved_flow_matches``), instead of retraining them
    reuse: bool = False
    # (a) digits -> digits_permuted
    zoo_runs: int = 50
    zoo_epochs: int | None = None  # None: the task recipe's
    flow_steps: int = 3000
    permutation_seed: int = 1
    target_runs: int = 10
    target_epochs: int | None = None
    samples: int = 32
    guidance: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0)
    sample_steps: tuple[int, ...] = (32, 128, 256, 512)  # the thesis transfers with 512 Euler steps
    raw_guidance: tuple[float, ...] = (0.1, 1.0)  # thesis-style unnormalized gradients, at the largest steps
    #: where the normalized guidance takes its gradient, each swept over the whole (λ, steps) grid of both pairs
    #: (``SampleConfig.guidance_at``): "x", the current point x_t (the thesis's form); "x1", the flow's prediction
    guidance_at: tuple[str, ...] = ("x", "x1")
    candidates: int = 8
    # (a) mnist1d -> shuffled mnist1d (the task's 40-10-10 networks and SGD recipe: the thesis's MNIST protocol)
    mnist1d: bool = True
    mnist1d_widths: tuple[int, ...] | None = None  # None: the task's
    mnist1d_zoo_runs: int | None = None  # None: the task recipe's
    mnist1d_zoo_epochs: int | None = None
    mnist1d_flow_steps: int = 3000
    mnist1d_samples: int = 16
    mnist1d_guidance: tuple[float, ...] = (0.0, 3.0, 10.0, 30.0)
    mnist1d_sample_steps: tuple[int, ...] = (64, 256)
    sequence_permutation_seed: int = 1
    # (a) mnist -> fashion_mnist (784-10-10, the thesis's MNIST recipe and its transfer pair), only when the user
    # gives a folder holding both datasets' IDX files (``MNIST/raw`` and ``FashionMNIST/raw``, or the raw files
    # of one of them at the top: see the tasks). Nothing is downloaded.
    mnist_root: str | None = None
    mnist_zoo_runs: int | None = None  # None: the task recipe's
    mnist_zoo_epochs: int | None = None
    mnist_flow_steps: int = 3000
    mnist_samples: int = 16
    mnist_guidance: tuple[float, ...] = (0.0, 3.0, 10.0, 30.0)
    mnist_sample_steps: tuple[int, ...] = (64, 256)
    #: training points of the target task the guidance gradient sees (a fixed random subset; None: all 55,000):
    #: every guided step takes one full-batch gradient of every sample
    mnist_support: int | None = 4096
    # (b) learned initialization on the held-out digits_permuted task
    init_seeds: int = 8
    init_steps: int = 1000
    init_eval_every: int = 10
    init_lr: float = 1e-3
    init_batch: int = 64
    # (c) architecture transfer of the digits flow
    arch_widths: tuple[tuple[int, ...], ...] = ((64, 5, 10), (64, 16, 10), (64, 32, 10))
    arch_steps: int = 128
    arch_guidance: float = 10.0

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {list(PRESETS)}")
        if min(self.samples, self.candidates, self.init_seeds, self.init_steps, self.target_runs) < 1:
            raise ValueError("samples, candidates, init_seeds, init_steps and target_runs must be ≥ 1")
        from metaflow_ws.flows.couplings import COUPLINGS

        if self.coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {self.coupling!r}; expected one of {list(COUPLINGS)}")
        check_path_noise(self.path_noise, "path_noise")
        check_lr(self.flow_lr, "flow_lr")
        if self.mnist_support is not None and self.mnist_support < 1:
            raise ValueError(f"mnist_support must be ≥ 1 training points or None (all); got {self.mnist_support}")
        if not self.sample_steps or min(self.sample_steps) < 1:
            raise ValueError(f"sample_steps must hold positive step counts; got {self.sample_steps}")
        from metaflow_ws.flows.sampling import GUIDANCE_POINTS

        if not self.guidance_at or any(a not in GUIDANCE_POINTS for a in self.guidance_at):
            raise ValueError(f"guidance_at must name guidance points of {list(GUIDANCE_POINTS)}; got {self.guidance_at}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TransferConfig:
        """``full`` (≈ 30–40 CPU-minutes), ``quick`` (a couple of minutes), ``tiny`` (seconds; tests)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {list(PRESETS)}")
        base: dict[str, Any] = {}
        if name == "quick":
            base = dict(d_model=16, num_layers=2, zoo_runs=20, zoo_epochs=10, flow_steps=300, target_runs=5,
                        target_epochs=10, samples=16, guidance=(0.0, 3.0, 10.0), sample_steps=(16, 64),
                        raw_guidance=(1.0,), candidates=4, mnist1d_zoo_runs=10, mnist1d_zoo_epochs=10,
                        mnist1d_flow_steps=150, mnist1d_samples=8, mnist1d_guidance=(0.0, 10.0),
                        mnist1d_sample_steps=(32,), mnist_zoo_runs=10, mnist_zoo_epochs=3, mnist_flow_steps=150,
                        mnist_samples=8, mnist_guidance=(0.0, 10.0), mnist_sample_steps=(32,), init_seeds=5,
                        init_steps=300, arch_widths=((64, 32, 10),), arch_steps=32)
        elif name == "tiny":
            base = dict(d_model=8, num_layers=1, zoo_runs=4, zoo_epochs=2, flow_steps=4, target_runs=2,
                        target_epochs=2, samples=4, guidance=(0.0, 3.0), sample_steps=(2,), raw_guidance=(),
                        candidates=2, mnist1d=False, mnist_zoo_runs=2, mnist_zoo_epochs=1, mnist_flow_steps=4,
                        mnist_samples=4, mnist_guidance=(0.0, 3.0), mnist_sample_steps=(2,), mnist_support=256,
                        init_seeds=2, init_steps=20, init_eval_every=5,
                        arch_widths=((64, 16, 10),), arch_steps=2)
        return cls(preset=name, **{**base, **overrides})


@dataclass(frozen=True)
class _Pair:
    key: str
    source: Task
    target: Task
    zoo_runs: int
    zoo_epochs: int | None
    flow_steps: int
    samples: int
    guidance: tuple[float, ...]
    sample_steps: tuple[int, ...]
    raw_guidance: tuple[float, ...]
    #: training points of the target the guidance gradient sees (None: all)
    support_points: int | None = None

    @property
    def label(self) -> str:
        return f"{self.source.name} → {self.target.name}"


def _pairs(cfg: TransferConfig) -> list[_Pair]:
    pairs = [_Pair("digits", get_task("digits"), get_task("digits_permuted", permutation_seed=cfg.permutation_seed),
                   cfg.zoo_runs, cfg.zoo_epochs, cfg.flow_steps, cfg.samples, cfg.guidance, cfg.sample_steps,
                   cfg.raw_guidance)]
    if cfg.mnist1d:
        base = get_task("mnist1d")
        spec = NetworkSpec(cfg.mnist1d_widths) if cfg.mnist1d_widths else base.spec
        w = "-".join(map(str, spec.widths))
        src = dataclasses.replace(base, spec=spec, name=f"mnist1d[{w}]")
        tgt = dataclasses.replace(base.variant(sequence_permutation_seed=cfg.sequence_permutation_seed), spec=spec,
                                  name=f"mnist1d_shuffled[{w},seed={cfg.sequence_permutation_seed}]")
        runs = cfg.mnist1d_zoo_runs or base.recipe.runs
        pairs.append(_Pair("mnist1d", src, tgt, runs, cfg.mnist1d_zoo_epochs, cfg.mnist1d_flow_steps,
                           cfg.mnist1d_samples, cfg.mnist1d_guidance, cfg.mnist1d_sample_steps, ()))
    if cfg.mnist_root is not None:
        src = dataclasses.replace(get_task("mnist").variant(root=str(cfg.mnist_root)), name="mnist")
        tgt = dataclasses.replace(get_task("fashion_mnist").variant(root=str(cfg.mnist_root)), name="fashion_mnist")
        pairs.append(_Pair("mnist", src, tgt, cfg.mnist_zoo_runs or src.recipe.runs, cfg.mnist_zoo_epochs,
                           cfg.mnist_flow_steps, cfg.mnist_samples, cfg.mnist_guidance, cfg.mnist_sample_steps, (),
                           cfg.mnist_support))
    return pairs


def _check_data(pairs: Sequence[_Pair]) -> None:
    """Load every task's data up front, so that a missing or corrupt MNIST folder fails before an hour of work
    (``FileNotFoundError`` / ``ValueError`` naming the folder and the files it needs)."""
    for pair in pairs:
        pair.source.data(0)
        pair.target.data(0)


# --------------------------------------------------------------------------------------------------- helpers
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _metrics(spec: NetworkSpec, params: Params, task: Task, split: str, device: torch.device) -> dict[str, Tensor]:
    x, y = task.data(0, device=device).split(split)
    return batch_metrics(spec, {k: v.to(device) for k, v in params.items()}, x, y, task.kind)


def _summary(acc: Tensor) -> dict[str, float]:
    return {"accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std(unbiased=False)) if acc.numel() > 1 else 0.0}


def _best_of_k(train_loss: Tensor, test_acc: Tensor, k: int) -> float:
    """Mean test accuracy of the lowest-train-loss network in each group of ``k`` consecutive samples."""
    k = max(1, min(k, train_loss.numel()))
    groups = train_loss.numel() // k
    tl = train_loss[: groups * k].view(groups, k)
    ta = test_acc[: groups * k].view(groups, k)
    return float(ta.gather(1, tl.argmin(1, keepdim=True)).mean())


def _support(task: Task, device: torch.device, points: int | None = None, seed: int = 0) -> Support:
    """The task's training split as guidance data; ``points``: a fixed random subset of that many (seeded)."""
    x, y = task.data(0, device=device).split("train")
    if points is not None and points < x.shape[0]:
        keep = torch.randperm(x.shape[0], generator=_gen(seed + 211))[:points].to(x.device)
        x, y = x[keep], y[keep]
    return Support(x, y, task.kind)


def _uniform_sampler(**kw: Any) -> SampleConfig:
    """Every draw of this experiment: the uniform time grid (``rho=1``) its results were measured with."""
    return SampleConfig(rho=1.0, **kw)


def guidance_only(flow: WeightFlow, n: int, config: SampleConfig, support: Support, *,
                  generator: torch.Generator | None = None) -> Tensor:
    """The guidance part of :func:`~metaflow_ws.flows.sampling.sample` alone: the same prior draw and the same
    ``config.steps`` guidance steps of size ``dt · λ`` on the flow's geometry, with the flow's velocity switched
    off (Riemannian gradient descent from the prior). The baseline that tells what the flow adds to guidance."""
    man = flow.path_manifold
    x = flow.sample_prior(n, generator=generator)
    dt = 1.0 / config.steps
    for _ in range(config.steps):
        g = man.proj_tangent(x, guidance_gradient(flow, x, support.x, support.y, support.kind))
        if config.guidance_normalize:
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x = man.exp(x, -dt * config.guidance * g)
    return flow.data_manifold.project(x).detach()


def _draw(flow: WeightFlow, n: int, sc: SampleConfig, support: Support | None, seed: int,
          *, no_flow: bool = False) -> tuple[Params, float]:
    t0 = time.perf_counter()
    if no_flow:
        assert support is not None
        x = guidance_only(flow, n, sc, support, generator=_gen(seed))
    else:
        gd = (support.x, support.y, support.kind) if sc.guidance > 0 and support is not None else None
        x = sample(flow, n, sc, generator=_gen(seed), guidance_data=gd)
    return {k: v.detach() for k, v in flow.decode(x).items()}, time.perf_counter() - t0


def _evaluate_cell(flow: WeightFlow, params: Params, task: Task, k: int, device: torch.device) -> dict[str, float]:
    spec = flow.spec
    test = _metrics(spec, params, task, "test", device)
    val = _metrics(spec, params, task, "val", device)
    train = _metrics(spec, params, task, "train", device)
    return {**_summary(test["accuracy"]), "val_accuracy_mean": float(val["accuracy"].mean()),
            "train_loss_mean": float(train["loss"].mean()),
            f"best_of_{k}_accuracy": _best_of_k(train["loss"], test["accuracy"], k)}


def _trained(task: Task, runs: int, epochs: int | None, seed: int, device: torch.device,
             optimizer: str | None = None) -> dict[str, Any]:
    """Final test accuracy of ``runs`` networks trained on ``task`` (its recipe, or Adam lr 3e-3)."""
    if optimizer == "adam" and task.recipe.optimizer != "adam":
        task = dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, optimizer="adam", lr=3e-3,
                                                                    momentum=0.0, nesterov=False))
    t0 = time.perf_counter()
    zoo = train_population(task, runs, epochs=epochs, seed=seed + 7, device=device)
    fin = zoo.final()
    acc = fin.metrics["test_accuracy"]
    rec = task.recipe
    return {"optimizer": rec.optimizer, "lr": rec.lr, "epochs": epochs or rec.epochs, "runs": runs,
            **_summary(acc), "seconds": time.perf_counter() - t0}


def _train_source_flow(pair: _Pair, cfg: TransferConfig, out: Path | None, device: torch.device,
                       log: Callable[[str], None]) -> tuple[WeightFlow, dict[str, Any]]:
    t0 = time.perf_counter()
    zoo = train_population(pair.source, pair.zoo_runs, epochs=pair.zoo_epochs, seed=cfg.seed, device=device)
    zoo_acc = zoo.final().metrics["test_accuracy"]
    log(f"  {pair.source.name} zoo: {pair.zoo_runs} runs, {len(zoo)} checkpoints, final test acc "
        f"{float(zoo_acc.mean()):.3f} ({time.perf_counter() - t0:.0f}s)")
    rec = pair.source.recipe
    fc = FlowConfig(flow=cfg.flow, widths=zoo.spec.widths, activation=zoo.spec.activation, task=pair.source.name,
                    prior_std=rec.init_std, d_model=cfg.d_model, num_layers=cfg.num_layers, sigma=cfg.path_noise)
    tc = TrainConfig(steps=pair.flow_steps, lr=cfg.flow_lr, seed=cfg.seed, coupling=cfg.coupling, align=True,
                     compile=cfg.compile, precision=cfg.precision)
    folder = out / "flows" / pair.key if out is not None else None
    zoo_seconds = time.perf_counter() - t0
    if cfg.reuse and folder is not None and saved_flow_matches(folder, fc, tc, zoo):
        flow = WeightFlow.from_pretrained(folder, device=device).eval()
        seconds, final_loss, reused = float(flow.meta.get("seconds", 0.0)), flow.meta.get("final_loss"), True
        log(f"  reusing the {cfg.flow} flow in {folder} (trained {seconds:.0f}s, loss {final_loss:.3f})")
    else:
        res = train_flow(zoo, fc, tc, folder, device=device)
        flow, seconds, final_loss, reused = res.flow, res.seconds, res.final_loss, False
        log(f"  {cfg.flow} flow on {pair.source.name}: {pair.flow_steps} steps in {seconds:.0f}s "
            f"(loss {final_loss:.3f})")
    info = {"zoo_runs": pair.zoo_runs, "zoo_checkpoints": len(zoo), "zoo_epochs": pair.zoo_epochs or rec.epochs,
            "zoo_seconds": round(zoo_seconds, 1), "zoo_final": _summary(zoo_acc), "flow_steps": pair.flow_steps,
            "flow_seconds": round(seconds, 1), "flow_final_loss": final_loss, "flow_reused": reused,
            "flow_params": sum(p.numel() for p in flow.field.parameters()),
            "flow_folder": str(folder) if folder is not None else None}
    return flow, info


# ------------------------------------------------------------------------------------------ (a) task transfer
def task_transfer(pair: _Pair, flow: WeightFlow, cfg: TransferConfig, device: torch.device,
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Sweep guidance strength × steps for one source → target pair (plus guidance-only and trained rows)."""
    k = cfg.candidates
    support = _support(pair.target, device, pair.support_points, cfg.seed)
    out: dict[str, Any] = {"key": pair.key, "source": pair.source.name, "target": pair.target.name,
                           "architecture": flow.spec.describe(), "samples": pair.samples, "candidates": k}
    if pair.support_points is not None:
        out["guidance_points"] = int(support.x.shape[0])
    steps_max = max(pair.sample_steps)
    out["target_trained"] = {"recipe": _trained(pair.target, cfg.target_runs, cfg.target_epochs, cfg.seed, device)}
    if pair.target.recipe.optimizer != "adam":
        out["target_trained"]["adam"] = _trained(pair.target, cfg.target_runs, cfg.target_epochs, cfg.seed, device,
                                                 optimizer="adam")
    best_trained = max(v["accuracy_mean"] for v in out["target_trained"].values())
    adam = out["target_trained"].get("adam", out["target_trained"]["recipe"])["accuracy_mean"]
    log("  trained on the target: " + ", ".join(f"{n} {v['accuracy_mean']:.3f}" for n, v in out["target_trained"].items()))
    rows: list[dict[str, Any]] = []

    def cell(lam: float, steps: int, *, normalized: bool = True, no_flow: bool = False, at: str = "x") -> dict[str, Any]:
        sc = _uniform_sampler(steps=steps, guidance=lam, guidance_normalize=normalized, guidance_at=at)
        params, secs = _draw(flow, pair.samples, sc, support, cfg.seed, no_flow=no_flow)
        row = {"method": "guidance only" if no_flow else "flow", "guidance": lam, "steps": steps,
               "normalized": normalized, "guidance_at": at, **_evaluate_cell(flow, params, pair.target, k, device),
               "seconds": round(secs, 2)}
        if lam == 0 and not no_flow and steps == steps_max:  # the same draws, scored on the source task
            out["source_unguided"] = {**_evaluate_cell(flow, params, pair.source, k, device), "steps": steps}
            log(f"  unguided samples on the source task: {out['source_unguided']['accuracy_mean']:.3f}")
        row["fraction_of_adam"] = row["accuracy_mean"] / adam
        log(f"    {_sampler(row):<16} λ={lam:<5g} steps={steps:<4d}: "
            f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} (best of {k}: {row[f'best_of_{k}_accuracy']:.3f}, "
            f"{secs:.1f}s)")
        return row

    for steps in pair.sample_steps:
        for lam in pair.guidance:
            for at in cfg.guidance_at if lam > 0 else ("x",):  # unguided: one cell, wherever the gradient would be
                rows.append(cell(lam, steps, at=at))
    if 0.0 not in pair.guidance:
        rows.append(cell(0.0, steps_max))
    for lam in pair.raw_guidance:
        rows.append(cell(lam, steps_max, normalized=False))
    for lam in [g for g in pair.guidance if g > 0]:
        rows.append(cell(lam, steps_max, no_flow=True))
    out["sweep"] = rows
    guided = [r for r in rows if r["method"] == "flow" and r["guidance"] > 0]
    only = [r for r in rows if r["method"] == "guidance only"]
    if guided:
        best = max(guided, key=lambda r: r["val_accuracy_mean"])  # chosen on validation, reported on test
        out["best_guided"] = best
        out["best_guided_at"] = {at: max((r for r in guided if r["guidance_at"] == at and r["normalized"]),
                                         key=lambda r: r["val_accuracy_mean"])
                                 for at in dict.fromkeys(r["guidance_at"] for r in guided if r["normalized"])}
        out["goal_fraction"] = best["accuracy_mean"] / adam
        out["goal_fraction_best_trained"] = best["accuracy_mean"] / best_trained
    if only:
        out["best_guidance_only"] = max(only, key=lambda r: r["val_accuracy_mean"])
    return out


# ----------------------------------------------------------------------------------- (b) learned initialization
@dataclass(frozen=True, eq=False)
class _Preset:
    """A functional optimizer whose initial state is given (the warm-started moments or momentum)."""

    base: Any
    state0: dict

    def init(self, params: Tensor) -> dict:
        return {k: v.to(params.device) for k, v in self.state0.items()}

    def step(self, params: Tensor, grads: Tensor, state: dict) -> tuple[Tensor, dict]:
        return self.base.step(params, grads, state)


def _curves(spec: NetworkSpec, task: Task, inits: dict[str, Tensor], opt_factory: Callable[[str, Tensor], Any],
            cfg: TransferConfig, device: torch.device) -> tuple[list[int], dict[str, Tensor]]:
    """Train every init (``[S, D]`` each) for ``cfg.init_steps`` minibatch steps; test accuracy ``[S, T]`` at
    the evaluation steps (step 0 = the init). Runs sharing an optimizer state layout train in one vmapped call."""
    data = task.data(0, device=device)
    x, y = data.x_train, data.y_train
    y1 = torch.nn.functional.one_hot(y, spec.out_features).to(x.dtype)
    bs = min(cfg.init_batch, x.shape[0])
    spe = steps_per_epoch(x.shape[0], bs)
    epochs = math.ceil(cfg.init_steps / spe)
    evals = sorted({s for s in range(cfg.init_eval_every, cfg.init_steps + 1, cfg.init_eval_every)} | {cfg.init_steps})
    out: dict[str, Tensor] = {}
    for name, flat in inits.items():
        s = flat.shape[0]
        gens = [_gen(cfg.seed * 1000 + 17 + i) for i in range(s)]  # the same data order for seed i in every method
        kept, _ = fit_population(spec, task.kind, flat.to(device), x, y1, opt_factory(name, flat), epochs=epochs,
                                 batch_size=bs, order_gens=gens, keep=set(evals))
        both = torch.cat([flat.to(device).unsqueeze(1), kept.view(s, len(evals), -1)], 1)  # [S, 1 + T, D]
        acc = _metrics(spec, spec.unflatten(both.reshape(-1, spec.num_params)), task, "test", device)["accuracy"]
        out[name] = acc.view(s, 1 + len(evals)).cpu()
    return [0, *evals], out


def _first_step(steps: Sequence[int], curve: Tensor, threshold: float) -> int | None:
    hit = (curve >= threshold - 1e-9).nonzero()
    return int(steps[int(hit[0])]) if hit.numel() else None


def _warm_states(spec: NetworkSpec, cand: dict[str, Tensor], pick: Tensor, support: Support, cfg: TransferConfig,
                 adam: Adam, sgd: SGD) -> dict[str, dict[str, Tensor]]:
    """The optimizer states :func:`~metaflow_ws.init.warm_start` sets, for ``s`` groups of ``k`` candidates
    (``cand``: ``{name: [s·k, ...]}``; ``pick``: ``[s]``, the chosen candidate of each group), vmapped over the
    groups. Adam: the chosen network's own mean gradient (m) and second moments pooled over the group's ``k``
    candidates (v), as if ``k · M`` gradients had been seen; SGD: the momentum buffer is the chosen network's mean
    gradient (plus the L2 term)."""
    s, k = pick.shape[0], next(iter(cand.values())).shape[0] // pick.shape[0]
    grads = candidate_gradients(spec, cand, support, grad_batches=4, batch_size=cfg.init_batch,
                                generator=_gen(cfg.seed + 106))
    g = spec.flatten({n: v.flatten(0, 1) for n, v in grads.items()})  # [s·k·M, D]
    m_b = g.shape[0] // (s * k)
    g = g.view(s, k, m_b, -1)
    n_seen = k * m_b
    b1, b2 = adam.betas
    m_hat = g[torch.arange(s), pick].mean(1)
    v_hat = g.pow(2).mean((1, 2))
    chosen = spec.flatten(cand).view(s, k, -1)[torch.arange(s), pick]
    return {"adam": {"m": (1 - b1**n_seen) * m_hat, "v": (1 - b2**n_seen) * v_hat,
                     "t": torch.tensor(n_seen, dtype=torch.int64)},
            "sgd": {"buf": m_hat + sgd.weight_decay * chosen, "t": torch.tensor(1, dtype=torch.int64)}}


def learned_init(pair: _Pair, flow: WeightFlow, best: dict[str, Any] | None, best_only: dict[str, Any] | None,
                 cfg: TransferConfig, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """Train on the held-out target from flow samples vs default inits (see the module docstring)."""
    task, spec, k, s = pair.target, flow.spec, cfg.candidates, cfg.init_seeds
    support = _support(task, device)
    g_steps = best["steps"] if best else max(pair.sample_steps)
    sc_guided = _uniform_sampler(steps=g_steps, guidance=best["guidance"] if best else 0.0, guidance_normalize=True,
                             guidance_at=best["guidance_at"] if best else "x")
    t0 = time.perf_counter()
    inits: dict[str, Tensor] = {
        "PyTorch default (kaiming-uniform)": spec.flatten(spec.init(s, scheme="kaiming_uniform", generator=_gen(cfg.seed + 101))),
        "N(0, 0.1)": spec.flatten(spec.init(s, scheme="normal", std=0.1**0.5, generator=_gen(cfg.seed + 102))),
    }
    # inits decoded from flow coordinates are rebalanced as init_ does (balance_scales) unless the label says not
    unguided, _ = _draw(flow, s, _uniform_sampler(steps=g_steps), None, cfg.seed + 103)
    inits["flow, unguided"] = spec.flatten(balance_scales(spec, unguided))
    if best_only is not None:
        only, _ = _draw(flow, s, _uniform_sampler(steps=best_only["steps"], guidance=best_only["guidance"],
                                              guidance_normalize=True), support, cfg.seed + 104, no_flow=True)
        inits[f"guidance only (λ={best_only['guidance']:g}, {best_only['steps']} steps)"] = spec.flatten(
            balance_scales(spec, only))
    rec = task.recipe
    adam, sgd = Adam(lr=cfg.init_lr), SGD(lr=rec.lr, momentum=rec.momentum, weight_decay=rec.weight_decay)
    warm: dict[str, dict[str, tuple[dict[str, Tensor], Tensor]]] = {"adam": {}, "sgd": {}}  # label -> (state, init)
    if best is not None:
        raw, _ = _draw(flow, s * k, sc_guided, support, cfg.seed + 105)  # s groups of k candidates
        cand = balance_scales(spec, raw)
        flat = spec.flatten(cand).view(s, k, -1)
        losses = batch_metrics(spec, cand, support.x, support.y, task.kind)["loss"].view(s, k)
        pick = losses.argmin(1)
        label = f"flow + guidance ({_cell_label(best)})"
        inits[label] = flat[:, 0]
        inits[f"{label}, best of {k}"] = flat[torch.arange(s), pick]
        raw_pick = spec.flatten(raw).view(s, k, -1)[torch.arange(s), pick]
        inits[f"{label}, best of {k}, not rebalanced"] = raw_pick
        # what warm_start gives (Adam: the decoded scales, SGD: rebalanced), plus Adam from rebalanced candidates
        balanced = _warm_states(spec, cand, pick, support, cfg, adam, sgd)
        decoded = _warm_states(spec, raw, pick, support, cfg, adam, sgd)
        warm_label = f"{label}, best of {k}, not rebalanced + warm-started Adam state"
        warm_sgd_label = f"{label}, best of {k} + warm-started momentum"
        warm = {"adam": {warm_label: (decoded["adam"], raw_pick),
                         f"{label}, best of {k} + warm-started Adam state": (balanced["adam"],
                                                                              inits[f"{label}, best of {k}"])},
                "sgd": {warm_sgd_label: (balanced["sgd"], inits[f"{label}, best of {k}"])}}
    sample_seconds = time.perf_counter() - t0
    primary = {"adam": warm_label, "sgd": warm_sgd_label} if best is not None else {}
    results: dict[str, Any] = {"task": task.name, "seeds": s, "candidates": k, "batch_size": cfg.init_batch,
                               "primary": primary,
                               "steps": cfg.init_steps, "sample_seconds": round(sample_seconds, 1),
                               "guidance_gradient_evaluations_per_network": g_steps if best else 0,
                               "optimizers": {}}
    for opt_name in ("adam", "sgd"):
        t1 = time.perf_counter()
        base = adam if opt_name == "adam" else sgd
        preset = warm[opt_name]
        runs = dict(inits) | {name: init for name, (_, init) in preset.items()}

        def factory(name: str, flat: Tensor, base: Any = base, preset: dict = preset) -> Any:
            return _Preset(base, preset[name][0]) if name in preset else base
        steps, curves = _curves(spec, task, runs, factory, cfg, device)
        default = curves["PyTorch default (kaiming-uniform)"].mean(0)
        thr_final = float(default[-1])
        thresholds = {"default final": thr_final, "0.8": 0.8, "0.9": 0.9}
        d_steps = {n: _first_step(steps, default, v) for n, v in thresholds.items()}
        methods = {}
        for name, c in curves.items():
            mean = c.mean(0)
            first = {n: _first_step(steps, mean, v) for n, v in thresholds.items()}
            ratio = (first["default final"] / d_steps["default final"]
                     if first["default final"] is not None and d_steps["default final"] else None)
            methods[name] = {"curve_mean": mean.tolist(), "curve_std": c.std(0, unbiased=False).tolist(),
                             "initial_accuracy": float(mean[0]), "final_accuracy_mean": float(mean[-1]),
                             "final_accuracy_std": float(c[:, -1].std(unbiased=False)),
                             "steps_to": first, "ratio_to_default": ratio}
        desc = (f"Adam lr {cfg.init_lr:g}" if opt_name == "adam" else
                f"SGD lr {task.recipe.lr:g}, momentum {task.recipe.momentum:g} (the task recipe)")
        results["optimizers"][opt_name] = {"description": desc, "steps": steps, "thresholds": thresholds,
                                           "default_steps_to": d_steps, "methods": methods,
                                           "seconds": round(time.perf_counter() - t1, 1)}
        for name, m in methods.items():
            log(f"    [{opt_name}] {name}: init {m['initial_accuracy']:.3f} → final {m['final_accuracy_mean']:.3f}, "
                f"reaches default's final ({thr_final:.3f}) at {m['steps_to']['default final']} "
                f"(ratio {m['ratio_to_default']})")
    return results


# ---------------------------------------------------------------------------------- (c) architecture transfer
def architecture_transfer(source: Task, flow: WeightFlow, cfg: TransferConfig, device: torch.device,
                          log: Callable[[str], None]) -> dict[str, Any]:
    """``flow`` (trained on ``source``) sampling the architectures ``cfg.arch_widths`` of the source task (other
    hidden widths; other depths where :meth:`WeightFlow.for_spec` allows), unguided, guided and by guidance
    alone, next to networks trained at each architecture with the task's recipe."""
    rows = []
    k = cfg.candidates
    widths = [flow.spec.widths, *[tuple(w) for w in cfg.arch_widths if tuple(w) != flow.spec.widths]]
    for w in widths:
        spec = NetworkSpec(w, flow.spec.activation)
        task = source.with_widths(w)
        f = flow.for_spec(spec)
        support = _support(task, device)
        row: dict[str, Any] = {"widths": list(w), "architecture": spec.describe(), "transferred": spec != flow.spec}
        guided = {at: "guided" + _at_suffix(at) for at in cfg.guidance_at}
        for name, sc, no_flow in [
            ("unguided", _uniform_sampler(steps=cfg.arch_steps), False),
            *[(guided[at], _uniform_sampler(steps=cfg.arch_steps, guidance=cfg.arch_guidance, guidance_normalize=True,
                                        guidance_at=at), False) for at in cfg.guidance_at],
            ("guidance only", _uniform_sampler(steps=cfg.arch_steps, guidance=cfg.arch_guidance, guidance_normalize=True),
             True),
        ]:
            params, secs = _draw(f, cfg.samples, sc, support, cfg.seed, no_flow=no_flow)
            row[name] = {**_evaluate_cell(f, params, task, k, device), "seconds": round(secs, 2)}
        row["trained"] = _trained(task, cfg.target_runs, cfg.target_epochs, cfg.seed, device)
        rows.append(row)
        log(f"    {spec.describe()}: " + ", ".join(f"{n} {row[n]['accuracy_mean']:.3f}" for n in _arch_columns(row)))
    return {"source": source.name, "flow_architecture": flow.spec.describe(), "activation": flow.spec.activation,
            "guidance": cfg.arch_guidance, "steps": cfg.arch_steps, "samples": cfg.samples, "rows": rows,
            "depth": _depth_note(flow.spec, widths)}


def _depth_note(spec: NetworkSpec, widths: Sequence[Sequence[int]]) -> str:
    """What the architecture-transfer table says about depth for a source flow of ``spec``."""
    from metaflow_ws.models.relational_transformer import layer_map

    if any(len(w) != len(spec.widths) for w in widths):
        return "other depths are in the table (interior layers continue the source's interior layers)"
    deeper = NetworkSpec((*spec.widths[:-1], spec.widths[-2], spec.widths[-1]), spec.activation)
    try:
        layer_map(spec, deeper)
    except ValueError:
        return (f"not possible from this source: {spec.describe()} has no hidden-to-hidden layer whose embeddings "
                "a deeper network could reuse (flows trained on networks with two or more hidden layers transfer "
                "to other depths through `WeightFlow.for_spec`)")
    return "not swept here (`TransferConfig.arch_widths` takes other depths)"


# -------------------------------------------------------------------------------------------------- driver
def run_transfer(cfg: TransferConfig, out: str | Path | None = None, *, device: torch.device | str | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (a), (b) and (c); returns the results dict (flows are saved under ``out/flows`` when ``out``)."""
    log = log or (lambda s: None)
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = Path(out) if out is not None else None
    t_all = time.perf_counter()
    results: dict[str, Any] = {"config": _jsonable(dataclasses.asdict(cfg)), "device": str(device),
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "seeds": {"seed": cfg.seed, "zoo_seed": cfg.seed, "flow_seed": cfg.seed,
                                         "trained_baseline_seed": cfg.seed + 7, "sampling_seed": cfg.seed,
                                         "init_seeds": f"{cfg.seed}+101..106 (draws), {cfg.seed}*1000+17+i (data order)",
                                         "data_seed": 0},
                               "seconds": {}, "task_transfer": [], "sources": {}}
    flows: dict[str, WeightFlow] = {}
    pairs = _pairs(cfg)
    _check_data(pairs)
    for pair in pairs:
        t0 = time.perf_counter()
        log(f"(a) {pair.label}")
        flow, info = _train_source_flow(pair, cfg, out, device, log)
        flows[pair.key] = flow
        results["sources"][pair.key] = info
        results["task_transfer"].append(task_transfer(pair, flow, cfg, device, log))
        results["seconds"][f"task_transfer_{pair.key}"] = round(time.perf_counter() - t0, 1)
    digits, tt = pairs[0], results["task_transfer"][0]
    t0 = time.perf_counter()
    log(f"(b) learned initialization on {digits.target.name}")
    results["learned_init"] = learned_init(digits, flows["digits"], tt.get("best_guided"), tt.get("best_guidance_only"),
                                           cfg, device, log)
    results["seconds"]["learned_init"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    log("(c) architecture transfer")
    results["architecture_transfer"] = architecture_transfer(digits.source, flows["digits"], cfg, device, log)
    results["seconds"]["architecture_transfer"] = round(time.perf_counter() - t0, 1)
    results["seconds"]["total"] = round(time.perf_counter() - t_all, 1)
    results["goals"] = _goals(results)
    return results


def _jsonable(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _jsonable(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_jsonable(v) for v in d]
    return d


def _goals(res: dict[str, Any]) -> list[dict[str, Any]]:
    goals = []
    for tt in res["task_transfer"]:
        if "best_guided" not in tt:
            continue
        adam = tt["target_trained"].get("adam", tt["target_trained"]["recipe"])["accuracy_mean"]
        b = tt["best_guided"]
        goals.append({"goal": f"guided transfer {tt['source']} → {tt['target']} ≥ 90 % of the Adam-trained accuracy",
                      "measured": f"{b['accuracy_mean']:.3f} / {adam:.3f} = {tt['goal_fraction']:.1%} "
                                  f"({_cell_label(b)}, chosen on validation)",
                      "met": tt["goal_fraction"] >= 0.9})
    li = res["learned_init"]
    for opt, r in li["optimizers"].items():
        name = li["primary"].get(opt)  # fixed in advance: what warm_start gives with this optimizer
        if name is None:
            continue
        m = r["methods"][name]
        ratio, reached = m["ratio_to_default"], m["steps_to"]["default final"]
        measured = (f"{ratio:.2f} of the steps ({reached} vs {r['default_steps_to']['default final']}; {name})"
                    if ratio is not None else f"never reached in {li['steps']} steps ({name})")
        goals.append({"goal": f"flow init reaches the default init's final test accuracy in ≤ 1/3 of the steps "
                              f"({r['description']})", "measured": measured, "met": ratio is not None and ratio <= 1 / 3})
    return goals


# ------------------------------------------------------------------------------------------------- writing
def _at_suffix(at: str) -> str:
    """``", ∇ at x̂1"`` for guidance at the flow's prediction; ``""`` at x_t (the thesis's form, unmarked)."""
    return ", ∇ at x̂1" if at == "x1" else ""


def _noise(cfg: dict[str, Any]) -> str:
    """``", path noise 0.3"`` (the source flows' ``FlowConfig.sigma``); ``""`` for results saved before it existed."""
    return f", path noise {cfg['path_noise']:g}" if "path_noise" in cfg else ""


def _arch_columns(row: dict[str, Any]) -> list[str]:
    """The populations of an architecture-transfer row, in table order."""
    return [n for n in ("unguided", "guided", "guided" + _at_suffix("x1"), "guidance only", "trained") if n in row]


def _sampler(row: dict[str, Any]) -> str:
    """A sweep row's sampler: ``flow`` (gradient at x_t), ``flow, ∇ at x̂1``, ``... (raw)``, ``guidance only``."""
    if row["method"] != "flow":
        return row["method"]
    name = "flow" + _at_suffix(row["guidance_at"])
    return name if row["normalized"] else f"{name} (raw)"


def _cell_label(row: dict[str, Any]) -> str:
    """``λ=30, 512 steps`` (``, ∇ at x̂1`` when the gradient is taken at the flow's prediction)."""
    return f"λ={row['guidance']:g}, {row['steps']} steps{_at_suffix(row['guidance_at'])}"


def _fmt(m: float, s: float | None = None) -> str:
    return f"{m:.3f}" if s is None else f"{m:.3f} ± {s:.3f}"


def _plots(res: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        figs[name] = _png(fig)

    tts = res["task_transfer"]
    fig, axes = plt.subplots(1, len(tts), figsize=(5.5 * len(tts), 4), squeeze=False)
    for ax, tt in zip(axes[0], tts):
        rows = [r for r in tt["sweep"] if r["method"] == "flow" and r["normalized"]]
        for j, steps in enumerate(sorted({r["steps"] for r in rows})):
            for at, style in (("x", "-"), ("x1", "--")):
                # the unguided cell (λ = 0) starts both lines
                rs = sorted((r for r in rows if r["steps"] == steps
                             and (r["guidance"] == 0 or r["guidance_at"] == at)), key=lambda r: r["guidance"])
                if not any(r["guidance"] > 0 for r in rs):
                    continue
                ax.errorbar([r["guidance"] for r in rs], [r["accuracy_mean"] for r in rs],
                            yerr=[r["accuracy_std"] for r in rs], marker="o", capsize=3, ls=style, color=f"C{j}",
                            label=f"flow, {steps} steps{_at_suffix(at)}")
        only = sorted((r for r in tt["sweep"] if r["method"] == "guidance only"), key=lambda r: r["guidance"])
        if only:
            ax.plot([r["guidance"] for r in only], [r["accuracy_mean"] for r in only], "k--", marker="x",
                    label=f"guidance only, {only[0]['steps']} steps")
        for name, v in tt["target_trained"].items():
            ax.axhline(v["accuracy_mean"], ls=":", color="gray")
            ax.text(0, v["accuracy_mean"], f" trained ({v['optimizer']})", va="bottom", fontsize=7, color="gray")
        adam = tt["target_trained"].get("adam", tt["target_trained"]["recipe"])["accuracy_mean"]
        ax.axhline(0.9 * adam, ls="-.", color="tab:red", lw=0.8, label="90 % of Adam-trained")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("guidance strength λ (normalized gradient)")
        ax.set_ylabel("test accuracy of samples")
        ax.set_title(f"{tt['source']} → {tt['target']}", fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
    save(fig, "guidance_sweep.png")

    li = res["learned_init"]["optimizers"]
    fig, axes = plt.subplots(1, len(li), figsize=(6 * len(li), 4.2), squeeze=False)
    for ax, (opt, r) in zip(axes[0], li.items()):
        steps = r["steps"]
        for name, m in r["methods"].items():
            mean, std = torch.tensor(m["curve_mean"]), torch.tensor(m["curve_std"])
            ax.plot(steps, mean, label=name, lw=1.2)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.15)
        ax.axhline(r["thresholds"]["default final"], ls=":", color="gray")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"test accuracy ({res['learned_init']['task']})")
        ax.set_title(r["description"], fontsize=9)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, loc="lower right")
    save(fig, "init_curves.png")

    figs["architecture_transfer.png"] = architecture_plot(res["architecture_transfer"])
    return figs


def architecture_plot(at: dict[str, Any]) -> bytes:
    """PNG bar chart of an :func:`architecture_transfer` result: accuracy per architecture and population."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = at["rows"]
    names = _arch_columns(rows[0])
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(rows), 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[name]["accuracy_mean"] for r in rows], width, yerr=[r[name]["accuracy_std"] for r in rows],
               capsize=2, label=name)
    ax.set_xticks(range(len(rows)), ["-".join(map(str, r["widths"])) + ("" if r["transferred"] else "\n(own)")
                                      for r in rows])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{at['flow_architecture']} flow on other architectures ({at['source']})", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def architecture_table(at: dict[str, Any], k: int) -> list[str]:
    """Markdown lines (description, plot, table) of an :func:`architecture_transfer` result; ``k``: best of k."""
    cols = _arch_columns(at["rows"][0])
    best_cols = [n for n in cols if n.startswith("guided")]
    lines = [f"The {at['flow_architecture']} flow of `{at['source']}` samples other architectures with "
             f"`flow.for_spec(spec)` ({at['samples']} samples, {at['steps']} steps; guided: λ={at['guidance']:g}, "
             f"normalized, on the training split). Trained: the task recipe at that architecture. Depth: "
             f"{at['depth']}.", "", "![architecture transfer](architecture_transfer.png)", "",
             "| architecture | " + " | ".join(cols) + "".join(f" | best of {k} ({n})" for n in best_cols) + " |",
             "|---" * (1 + len(cols) + len(best_cols)) + "|"]
    for r in at["rows"]:
        lines.append(f"| {r['architecture']}{'' if r['transferred'] else ' (the flow’s own)'} | "
                     + " | ".join(_fmt(r[n]['accuracy_mean'], r[n]['accuracy_std']) for n in cols)
                     + "".join(f" | {r[n][f'best_of_{k}_accuracy']:.3f}" for n in best_cols) + " |")
    return lines


def markdown(res: dict[str, Any], command: str) -> str:
    cfg = res["config"]
    k = cfg["candidates"]
    lines = ["# Transfer: guidance, learned initialization, architecture transfer", "",
             f"Written by `{command}` in {res['seconds']['total']:.0f} s on {res['device']} "
             f"({res['threads']} thread(s), torch {res['torch']}), preset `{cfg['preset']}`, seed {cfg['seed']} "
             f"(all seeds in `results.json`). Accuracies are on the test split (mean ± std over networks); every "
             f"choice of λ / steps is made on the validation split.", "", "## Goals", "",
             "| goal | measured | met |", "|---|---|---|"]
    for g in res["goals"]:
        lines.append(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else '**no**'} |")
    lines += ["", "## Findings (computed from the tables below)", ""] + [f"- {f}" for f in _findings(res)]
    lines += ["", "## Source flows", "", "Train s: as recorded when the flow was trained; *reused*: loaded from "
              "`flows/` by `--reuse` (an earlier run of the same configuration on the same zoo).", "",
              "| source | zoo | zoo final test acc | flow | steps | train s | reused |", "|---|---|---|---|---|---|---|"]
    for tt in res["task_transfer"]:
        s = res["sources"][tt["key"]]
        lines.append(f"| {tt['source']} ({tt['architecture']}) | {s['zoo_runs']} runs × {s['zoo_epochs']} epochs, "
                     f"{s['zoo_checkpoints']} checkpoints | {_fmt(s['zoo_final']['accuracy_mean'], s['zoo_final']['accuracy_std'])} "
                     f"| {cfg['flow']}, RT d={cfg['d_model']} × {cfg['num_layers']} ({s['flow_params']} params), aligned, "
                     f"coupling {cfg.get('coupling', 'ot')}{_noise(cfg)}, lr {cfg.get('flow_lr', 2e-3):g} "
                     f"| {s['flow_steps']} | {s['flow_seconds']:.0f} | {'yes' if s['flow_reused'] else 'no'} |")
    lines += ["", "## (a) Task transfer by guidance", "",
              "Guidance uses the target's whole training split; `normalized` scales each sample's guidance gradient "
              "to unit norm (`SampleConfig(guidance_normalize=True)`), `raw` is the thesis's form. *flow* takes the "
              "gradient at the current point x_t (the thesis's form), *flow, ∇ at x̂1* at the flow's prediction "
              "x̂1(x_t, t) of the network the sample is heading for (`SampleConfig(guidance_at=\"x1\")`). *Guidance only* "
              "takes the same prior draws and the same guidance steps with the flow's velocity switched off. "
              f"Best of {k}: the lowest-training-loss sample in each group of {k} (what `init_(..., candidates={k})` "
              "picks).", "", "![guidance sweep](guidance_sweep.png)", ""]
    for tt in res["task_transfer"]:
        tr = tt["target_trained"]
        lines += [f"### {tt['source']} → {tt['target']} ({tt['architecture']}, {tt['samples']} samples per cell)", "",
                  f"Unguided flow samples on the source task: {_fmt(tt['source_unguided']['accuracy_mean'], tt['source_unguided']['accuracy_std'])}. "
                  "Trained on the target: " + "; ".join(
                      f"{n} ({v['optimizer']} lr {v['lr']:g}, {v['epochs']} epochs, {v['runs']} runs) "
                      f"{_fmt(v['accuracy_mean'], v['accuracy_std'])}" for n, v in tr.items()) + "."
                  + (f" Guidance gradients on a fixed random subset of {tt['guidance_points']:,} training points of "
                     "the target." if "guidance_points" in tt else ""), "",
                  f"| sampler | λ | steps | test acc | best of {k} | val acc | vs Adam-trained | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tt["sweep"]:
            lines.append(f"| {_sampler(r)} | {r['guidance']:g} | {r['steps']} | {_fmt(r['accuracy_mean'], r['accuracy_std'])} "
                         f"| {r[f'best_of_{k}_accuracy']:.3f} | {r['val_accuracy_mean']:.3f} | "
                         f"{r['fraction_of_adam']:.0%} | {r['seconds']:.1f} |")
        lines.append("")
    li = res["learned_init"]
    lines += ["## (b) Learned initialization on the held-out task", "",
              f"Task `{li['task']}` (the flow never saw it), {li['seeds']} seeds per method (seed i: the same data "
              f"order for every method), batch {li['batch_size']}, {li['steps']} steps. Flow inits use the guided "
              f"cell chosen in (a); each guided init cost {li['guidance_gradient_evaluations_per_network']} full-batch "
              "gradient evaluations during sampling (not counted in the steps below). Inits decoded from flow "
              "coordinates are rebalanced as `init_` does (`balance_scales`) unless the row says otherwise. "
              "The goal rows are fixed in advance: what `warm_start` gives with that optimizer (Adam: the decoded "
              "scales, not rebalanced, plus warm-started moments; SGD: rebalanced, plus a warm-started momentum "
              "buffer). Steps-to-threshold are read "
              "off the mean curve; ratio = steps to reach the default init's final accuracy / the default init's own.",
              "", "![learned init](init_curves.png)", ""]
    for opt, r in li["optimizers"].items():
        thr = r["thresholds"]["default final"]
        lines += [f"**{r['description']}** (default init's final accuracy {thr:.3f}, reached at step "
                  f"{r['default_steps_to']['default final']})", "",
                  "| init | step 0 | final | steps to default's final | ratio | steps to 0.8 | steps to 0.9 |",
                  "|---|---|---|---|---|---|---|"]
        for name, m in r["methods"].items():
            st = m["steps_to"]
            ratio = "–" if m["ratio_to_default"] is None else f"{m['ratio_to_default']:.2f}"
            lines.append(f"| {name} | {m['initial_accuracy']:.3f} | {_fmt(m['final_accuracy_mean'], m['final_accuracy_std'])} "
                         f"| {st['default final'] if st['default final'] is not None else 'never'} | {ratio} "
                         f"| {st['0.8'] if st['0.8'] is not None else 'never'} | {st['0.9'] if st['0.9'] is not None else 'never'} |")
        lines.append("")
    lines += ["## (c) Architecture transfer", "", *architecture_table(res["architecture_transfer"], k)]
    lines += ["", "## Wall times (s)", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k_} | {v:.0f} |" for k_, v in res["seconds"].items()]
    lines.append("")
    return "\n".join(lines)


def _grid_edge(tt: dict[str, Any]) -> list[str]:
    """Which maxima of the guided flow grid (λ, steps) the chosen cell sits on (phrases for the findings)."""
    b = tt["best_guided"]
    grid = [r for r in tt["sweep"] if r["method"] == "flow" and r["normalized"] and r["guidance"] > 0
            and r["guidance_at"] == b["guidance_at"]]
    edge = []
    if len({r["guidance"] for r in grid}) > 1 and b["guidance"] == max(r["guidance"] for r in grid):
        edge.append(f"λ={b['guidance']:g} is the largest swept")
    if len({r["steps"] for r in grid}) > 1 and b["steps"] == max(r["steps"] for r in grid):
        edge.append(f"{b['steps']} steps the most")
    return edge


def _findings(res: dict[str, Any]) -> list[str]:
    out = []
    for tt in res["task_transfer"]:
        src, z = tt["source_unguided"], res["sources"][tt["key"]]["zoo_final"]
        out.append(f"{tt['source']}: unguided flow samples reach {src['accuracy_mean']:.3f} on the source task vs "
                   f"{z['accuracy_mean']:.3f} for the zoo's final networks (flow quality bounds what transfer gets).")
        if "best_guided" in tt and "best_guidance_only" in tt:
            b, o = tt["best_guided"], tt["best_guidance_only"]
            verdict = "adds to" if b["accuracy_mean"] > o["accuracy_mean"] else "does not beat"
            out.append(f"{tt['source']} → {tt['target']}: the flow {verdict} guidance alone — best guided "
                       f"{b['accuracy_mean']:.3f} ({_cell_label(b)}) vs guidance only "
                       f"{o['accuracy_mean']:.3f} (λ={o['guidance']:g}, {o['steps']} steps), both chosen on validation.")
        by_point = tt.get("best_guided_at", {})  # absent when no guided cell was swept
        if {"x", "x1"} <= set(by_point):
            bx, b1 = by_point["x"], by_point["x1"]
            verdict = "beats" if b1["accuracy_mean"] > bx["accuracy_mean"] else "does not beat"
            out.append(f"{tt['source']} → {tt['target']}: guidance with the gradient at the flow's prediction x̂1 "
                       f"{verdict} the gradient at x_t — {b1['accuracy_mean']:.3f} ({_cell_label(b1)}) vs "
                       f"{bx['accuracy_mean']:.3f} ({_cell_label(bx)}), each chosen on validation.")
        if "best_guided" in tt:
            edge = _grid_edge(tt)
            if edge:
                pre = "" if tt["key"] == "digits" else f"{tt['key']}_"
                out.append(f"{tt['source']} → {tt['target']}: the chosen cell lies on the edge of the swept grid "
                           f"({' and '.join(edge)}); a wider sweep (`TransferConfig.{pre}guidance`, "
                           f"`{pre}sample_steps`) may find a better one.")
    for row in res["architecture_transfer"]["rows"]:
        if row["transferred"]:
            out.append(f"{row['architecture']}: " + ", ".join(f"{n} {row[n]['accuracy_mean']:.3f}"
                                                               for n in _arch_columns(row)) + ".")
    out += growth_findings(res["architecture_transfer"])
    out.append(f"Depth: {res['architecture_transfer']['depth']}.")
    return out


def growth_findings(at: dict[str, Any]) -> list[str]:
    """For every transferred architecture that :func:`~metaflow_ws.nets.growth.grow` reaches from the flow's own
    (wider and/or deeper): the baseline of growing the own samples, which keep their functions and so exactly the
    own row's accuracies, against the field's transfer."""
    own = next((r for r in at["rows"] if not r["transferred"]), None)
    if own is None:
        return []
    own_spec = NetworkSpec(tuple(own["widths"]), at.get("activation", "relu"))  # results before it: relu
    out = []
    for r in at["rows"]:
        if not r["transferred"] or not can_grow(own_spec, r["widths"]):
            continue
        cols = [n for n in ("unguided", "guided" + _at_suffix("x1"), "guided") if n in r and n in own][:2]
        pairs = "; ".join(f"{n} {r[n]['accuracy_mean']:.3f} vs {own[n]['accuracy_mean']:.3f} grown" for n in cols)
        diff = [round(r[n]["accuracy_mean"], 3) - round(own[n]["accuracy_mean"], 3) for n in cols]  # as printed
        if all(d > 0 for d in diff):
            verdict = "beats"
        elif all(d >= 0 for d in diff):
            verdict = "matches" if all(d == 0 for d in diff) else "beats or matches"
        else:
            verdict = "partly beats" if any(d > 0 for d in diff) else "does not beat"
        out.append(f"{r['architecture']}: the field's transfer {verdict} growing the flow's own samples to it "
                   f"(`width_transfer='grow'`, Net2Net: the same functions, so the own row's accuracies) — {pairs}.")
    return out


def write_results(res: dict[str, Any], out: str | Path, command: str) -> Path:
    """Write ``README.md``, ``results.json`` and the PNG plots into ``out`` (each file atomically)."""
    out = Path(out)
    res = {**res, "command": command}
    for name, data in _plots(res).items():
        atomic_write_bytes(out / name, data)
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "README.md", markdown(res, command))
    return out
