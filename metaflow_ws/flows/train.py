"""Conditional flow matching on a zoo: x1 prediction, t ~ Beta(1, 2), independent or OT couplings, AdamW with
warm-up and cosine decay, gradient clipping, EMA weights, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from metaflow_ws.flows.couplings import make_coupling
from metaflow_ws.flows.flow import CONFIG_NAME, PRECISIONS, WEIGHTS_NAME, FlowConfig, WeightFlow
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json
from metaflow_ws.io.zoo import Zoo

__all__ = ["SupportSets", "TrainConfig", "TrainResult", "beta12", "check_lr", "flow_matching_loss", "query_loss",
           "saved_flow_matches", "task_flow_defaults", "train_flow"]

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


def check_lr(lr: float, name: str = "lr") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``lr`` is a valid learning rate (finite, > 0)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {lr}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_flow` (the CLI's defaults)."""

    steps: int = 3000
    batch_size: int = 32
    #: peak AdamW learning rate (after ``warmup`` steps, then cosine decay). 1e-2 rather than the 2e-3 of the
    #: earlier releases: same quality at 3,000 steps on breast_cancer, clearly better on digits and at short budgets
    #: (README, "Learning rate")
    lr: float = 1e-2
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    warmup: int = 100
    coupling: str = "ot-perm"
    align: bool = True
    align_method: str = "weight"
    seed: int = 0
    checkpoint_every: int = 500
    #: task-conditioned flows only: support sizes K drawn uniformly from this range at every step
    support_sizes: tuple[int, int] = (5, 20)
    #: weight of the meta-training loss on query sets of networks produced by a differentiable
    #: ``query_steps``-step Euler sampler (0 = flow matching only)
    query_weight: float = 0.0
    query_steps: int = 4
    query_points: int = 32
    #: run the vector field through ``torch.compile`` during training (see :meth:`WeightFlow.compiled`): about a
    #: minute of compilation, then 1.3-2.4× faster steps on CPU; worth it for long runs and large graphs
    compile: bool = False
    #: precision of the vector field during training: ``"fp32"`` or ``"bf16"`` (mixed precision, see
    #: :meth:`WeightFlow.autocast`; ≈ 1.4× faster compiled steps on CPUs with AMX / AVX512-BF16 and on GPUs)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {list(PRECISIONS)}")
        for k in ("steps", "batch_size", "checkpoint_every", "query_steps", "query_points"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be ≥ 1; got {getattr(self, k)}")
        check_lr(self.lr)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay}")
        lo, hi = (int(v) for v in self.support_sizes)
        if not 1 <= lo <= hi:
            raise ValueError(f"support_sizes must be (lo, hi) with 1 ≤ lo ≤ hi; got {self.support_sizes}")
        object.__setattr__(self, "support_sizes", (lo, hi))
        if self.query_weight < 0:
            raise ValueError(f"query_weight must be ≥ 0; got {self.query_weight}")


def task_flow_defaults(task: str | None) -> dict[str, int | float]:
    """``{"d_model", "num_layers", "lr"}`` of a flow over ``task``'s zoos: what the task file's ``[flow]`` table sets,
    the library's defaults (:class:`FlowConfig`, :class:`TrainConfig`) for the rest and for tasks that are not
    registered in this process (a zoo file of a task registered elsewhere still trains)."""
    from metaflow_ws.tasks import UnknownTaskError, get_task

    out: dict[str, int | float] = {"d_model": FlowConfig.d_model, "num_layers": FlowConfig.num_layers,
                                   "lr": TrainConfig.lr}
    if task is None:
        return out
    try:
        recipe = get_task(task).flow
    except UnknownTaskError:
        return out
    return out | {k: v for k, v in dataclasses.asdict(recipe).items() if v is not None}


@dataclass
class SupportSets:
    """Data of the tasks behind a family zoo, for task-conditioned flows.

    ``x: [T, n, x_dim]``, ``y: [T, n, y_dim]`` (one-hot float targets for classification) hold n examples of each
    of T tasks; ``task_of: [C]`` maps every network of the zoo to its task. Support and query sets are drawn
    from a network's own task, K distinct examples at a time.
    """

    x: Tensor
    y: Tensor
    task_of: Tensor
    kind: str = "regression"

    def __post_init__(self) -> None:
        if self.x.dim() != 3 or self.y.dim() != 3 or self.x.shape[:2] != self.y.shape[:2]:
            raise ValueError(f"support data must be x: (T, n, x_dim), y: (T, n, y_dim); got x {tuple(self.x.shape)}, "
                             f"y {tuple(self.y.shape)}")
        if self.task_of.dim() != 1 or (self.task_of.numel() and int(self.task_of.max()) >= self.x.shape[0]):
            raise ValueError(f"task_of must be a (C,) index into the {self.x.shape[0]} tasks")
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"kind must be 'regression' or 'classification'; got {self.kind!r}")

    def draw(self, idx: Tensor, k: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``k`` distinct examples of the task of each network in ``idx``: ``[B, k, x_dim]``, ``[B, k, y_dim]``."""
        n = self.x.shape[1]
        if not 1 <= k <= n:
            raise ValueError(f"cannot draw {k} support points from tasks with {n} examples")
        tasks = self.task_of[idx.cpu()]
        pick = torch.rand(len(tasks), n, generator=generator).argsort(1)[:, :k]
        rows = tasks.unsqueeze(1)
        return self.x[rows, pick], self.y[rows, pick]

    def to(self, device: torch.device | str) -> SupportSets:
        return SupportSets(self.x.to(device), self.y.to(device), self.task_of, self.kind)


@dataclass
class TrainResult:
    flow: WeightFlow
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_per_second: float = 0.0
    resumed_from: int = 0

    @property
    def final_loss(self) -> float | None:
        """Mean training loss over the last 100 steps."""
        return _tail_mean(self.losses)


def beta12(n: int, generator: torch.Generator | None = None) -> Tensor:
    """t ~ Beta(1, 2) by inverting its CDF 1 − (1 − t)²: ``[n]``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (1 - torch.sqrt(1 - u)).float()


def flow_matching_loss(flow: WeightFlow, x0: Tensor, x1: Tensor, t: Tensor, *, sigma: float = 0.0,
                       generator: torch.Generator | None = None, cond: Tensor | None = None) -> Tensor:
    """Mean squared error of the x1 prediction (in per-block scaled units) at x_t on the path from x0 to x1.

    ``sigma > 0`` (path noise, :attr:`FlowConfig.sigma`): x_t is moved by ``sigma · scale · ε``, ε ~ N(0, I), i.e.
    by σ times each block's data RMS, and projected back onto the path manifold; the target stays x1, so the field
    learns to pull points near the training paths back onto them.

    A preconditioned flow weights it by ``1 / c_out(t)²`` (clamped at 1e4): the squared error of the network
    output F against its unit-size target, which is (up to a per-block constant) the error of the velocity the
    sampler integrates, equally at every t.
    """
    x_t = flow.path_manifold.interpolate(x0, x1, t)
    if sigma > 0:
        eps = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        x_t = flow.path_manifold.project(x_t + sigma * flow.scale * eps)
    x1_hat = flow.predict_x1(x_t, t, cond)
    err = ((x1_hat - x1) / flow.scale) ** 2
    if flow.config.precondition:
        _, c_out = flow.preconditioning(t)
        err = err / c_out.pow(2).clamp_min(1e-4)
    return err.mean()


def query_loss(flow: WeightFlow, cond: Tensor, qx: Tensor, qy: Tensor, kind: str, *, steps: int,
               generator: torch.Generator | None = None, offset: dict[str, Tensor] | None = None) -> Tensor:
    """Mean task loss on query sets of the networks a differentiable ``steps``-step Euler sampler produces.

    ``cond: [B, cond_dim]``; ``qx: [B, Q, x_dim]``, ``qy: [B, Q, y_dim]``. Gradients flow through the whole
    trajectory into the vector field and the task encoder; the B networks are evaluated with one vmap.
    ``offset`` (one network ``{name: [1, ...]}``) is added to every decoded sample: a flow over the change from
    a shared initialisation produces the networks ``offset + decode(x)``.
    """
    from torch.func import vmap

    from metaflow_ws.train.losses import prediction_loss

    b = cond.shape[0]
    x = flow.sample_prior(b, generator=generator)
    man = flow.path_manifold
    for i in range(steps):
        t = torch.full((b,), i / steps, dtype=x.dtype, device=x.device)
        x = man.exp(x, flow.velocity(x, t, cond) / steps)
    x = flow.data_manifold.project(x)
    spec = flow.spec
    params = flow.decode(x)
    if offset is not None:
        params = {n: v + offset[n].to(v) for n, v in params.items()}
    losses = vmap(lambda p, xq, yq: prediction_loss(spec.forward(p, xq), yq, kind))(params, qx, qy)
    return losses.mean()


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train_flow(
    zoo: Zoo,
    config: FlowConfig,
    train: TrainConfig = TrainConfig(),  # noqa: B008 - frozen dataclass, immutable
    out: str | Path | None = None,
    *,
    resume: bool = False,
    device: torch.device | str | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    support: SupportSets | None = None,
    anchor: dict[str, Tensor] | Tensor | None = None,
    query_offset: dict[str, Tensor] | None = None,
) -> TrainResult:
    """Train a flow of ``config`` on the networks of ``zoo``; returns the flow with EMA weights.

    With ``out``, checkpoints go to ``out/checkpoint.safetensors`` every ``checkpoint_every`` steps (atomic) and
    the final flow to ``out/`` (``config.json`` + ``flow.safetensors``); ``resume=True`` continues from the last
    checkpoint and gives the same result as an uninterrupted run. ``progress(step, total, loss, steps_per_s)``.

    Task-conditioned flows (``config.encoder`` set) need ``support``: the data of the task of every network;
    each step embeds a fresh support set of every network in the batch (K ~ ``train.support_sizes``) and trains
    encoder and vector field jointly; ``train.query_weight > 0`` adds the query-set loss of
    :func:`query_loss`. Mini-batch OT couples networks of different tasks and would break the conditional
    marginals, so conditional training needs ``coupling="independent"`` (or ``"perm"``).

    Anchored flows (``config.anchor``) see ``anchor`` (one network, e.g. the shared initialization of a family
    zoo; with ``train.align`` it must be None and defaults to the alignment reference, the zoo's network 0) next
    to x_t; permutation couplings would move the data out of the anchor's basin, so they are refused.
    ``query_offset`` (one network) is added to the samples the query-set loss evaluates (a zoo of changes from a
    shared initialisation: the offset is that initialisation).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if zoo.spec != config.spec:
        raise ValueError(f"the zoo holds {zoo.spec.describe()} networks but the flow config is for "
                         f"{config.spec.describe()}")
    if (config.encoder is None) != (support is None):
        raise ValueError("task-conditioned training needs both a flow config with an encoder and support data "
                         "(support=SupportSets(...)); unconditional training takes neither")
    if support is not None:
        if train.coupling not in ("independent", "perm"):
            raise ValueError("mini-batch OT pairs networks of different tasks, which breaks a conditional flow; "
                             "use TrainConfig(coupling='perm') or 'independent' for task-conditioned flows")
        if support.task_of.shape != (len(zoo),):
            raise ValueError(f"support.task_of must map each of the zoo's {len(zoo)} networks to a task; "
                             f"got shape {tuple(support.task_of.shape)}")
        support = support.to(device)
    elif train.query_weight > 0:
        raise ValueError("query_weight > 0 needs a task-conditioned flow and support data")
    if config.anchor:
        if train.coupling not in ("independent", "ot"):
            raise ValueError(f"coupling {train.coupling!r} permutes every data network toward its noise draw, out "
                             "of the anchor's permutation basin; anchored flows take coupling 'independent' or 'ot'")
        if anchor is not None and train.align:
            raise ValueError("the zoo would be aligned to its network 0, not to the anchor you give: pass "
                             "TrainConfig(align=False) with an explicit anchor, or no anchor (it then defaults to "
                             "the alignment reference)")
    elif anchor is not None:
        raise ValueError("anchor= needs an anchored flow: FlowConfig(anchor=True)")
    t_start = time.perf_counter()
    if train.align:
        from metaflow_ws.symmetry import align_zoo

        zoo = align_zoo(zoo, 0, method=train.align_method, generator=torch.Generator().manual_seed(train.seed))
    config = dataclasses.replace(config, aligned=train.align)
    with torch.random.fork_rng(devices=[]):  # seeded model init without touching the caller's global RNG
        torch.manual_seed(train.seed)
        flow = WeightFlow(config)
    flow = flow.to(device)
    with torch.no_grad():
        x1_all = flow.encode({k: v.to(device, torch.float32) for k, v in zoo.params.items()})
    if not torch.isfinite(x1_all).all():
        raise ValueError("the zoo's weights give NaN/inf flow coordinates (zero or non-finite rows?)")
    if config.anchor:
        flow.set_anchor(x1_all[0] if anchor is None else anchor)
    flow.set_scale_from(x1_all)
    coupling = make_coupling(train.coupling, flow.path_manifold if config.flow == "geometric" else None, flow.coords)
    # fused AdamW: one kernel for all parameters (CPU and CUDA; ≈ 6× faster than the per-tensor loop at 600K params)
    opt = torch.optim.AdamW(flow.parameters(), lr=train.lr, weight_decay=train.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    live = flow.state_dict()  # tensors sharing the model's storage: the EMA reads them in place
    ema = {k: v.detach().clone() for k, v in live.items()}
    ema_float = [k for k, v in live.items() if v.is_floating_point()]
    ema_other = [k for k, v in live.items() if not v.is_floating_point()]
    gen = torch.Generator().manual_seed(train.seed + 1)
    losses: list[float] = []
    start = 0
    out = Path(out) if out is not None else None
    if resume:
        if out is None or not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"nothing to resume: {out}/{CHECKPOINT} does not exist")
        start, losses = _load_checkpoint(out, flow, ema, opt, gen, train)

    n = x1_all.shape[0]
    t_loop = time.perf_counter()
    flow.train()
    with flow.compiled(train.compile), flow.autocast(train.precision):
        for step in range(start, train.steps):
            for g in opt.param_groups:
                g["lr"] = train.lr * _lr_factor(step, train)
            idx = torch.randint(n, (train.batch_size,), generator=gen).to(device)
            x1 = x1_all[idx]
            x0 = flow.sample_prior(train.batch_size, generator=gen)
            x0, x1 = coupling(x0, x1)
            t = beta12(train.batch_size, gen).to(device)
            cond = None
            if support is not None:
                lo, hi = train.support_sizes
                k = int(torch.randint(lo, hi + 1, (1,), generator=gen))
                cond = flow.embed(*support.draw(idx, k, gen))
            loss = flow_matching_loss(flow, x0, x1, t, sigma=config.sigma, generator=gen, cond=cond)
            if train.query_weight > 0:
                assert support is not None and cond is not None
                qx, qy = support.draw(idx, train.query_points, gen)
                loss = loss + train.query_weight * query_loss(flow, cond, qx, qy, support.kind, offset=query_offset,
                                                              steps=train.query_steps, generator=gen)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"flow training diverged at step {step + 1} (loss={float(loss.detach())}); "
                                         f"lower --lr (now {train.lr}) or check the zoo for extreme weights")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), train.grad_clip)
            opt.step()
            decay = min(train.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_([ema[k] for k in ema_float], [live[k] for k in ema_float], 1 - decay)
                for k in ema_other:
                    ema[k].copy_(live[k])
            losses.append(float(loss.detach()))
            done = step + 1
            if out is not None and (done % train.checkpoint_every == 0 or done == train.steps):
                _save_checkpoint(out, done, losses, flow, ema, opt, gen, train)
            if progress is not None:
                progress(done, train.steps, losses[-1], (done - start) / max(time.perf_counter() - t_loop, 1e-9))
    seconds_loop = time.perf_counter() - t_loop
    flow.load_state_dict(ema)
    flow.eval()
    result = TrainResult(flow=flow, losses=losses, seconds=time.perf_counter() - t_start,
                         steps_per_second=(train.steps - start) / max(seconds_loop, 1e-9), resumed_from=start)
    flow.meta = {"train": dataclasses.asdict(train), "zoo_task": zoo.task, "zoo_checkpoints": len(zoo),
                 "zoo_data_seed": zoo.data_seed, "final_loss": result.final_loss, "seconds": result.seconds}
    if out is not None:
        flow.save_pretrained(out, extra=flow.meta)
    return result


def _setting_differences(recorded_config: dict | None, recorded_train: dict, config: FlowConfig, train: TrainConfig,
                         *, may_differ: frozenset[str]) -> list[str]:
    """The settings in which a saved flow or checkpoint (its recorded ``config`` and ``train`` dicts) differs from
    ``config`` and ``train``, as ``"key=recorded (now wanted)"``. ``aligned`` (set by training), the ``may_differ``
    training settings and training settings the file does not record are not compared; nor is the flow's
    configuration when ``recorded_config`` is None. Raises ``ValueError`` / ``KeyError`` / ``TypeError`` for a
    recorded configuration that :meth:`FlowConfig.from_dict` rejects."""
    diffs = []
    if recorded_config is not None:
        stored, want = FlowConfig.from_dict(recorded_config).to_dict(), config.to_dict()
        diffs += [f"{k}={stored.get(k)!r} (now {want.get(k)!r})" for k in sorted(stored.keys() | want.keys())
                  if k != "aligned" and stored.get(k) != want.get(k)]
    want_train = json.loads(json.dumps(dataclasses.asdict(train)))
    diffs += [f"{k}={recorded_train[k]!r} (now {v!r})" for k, v in want_train.items()
              if k in recorded_train and k not in may_differ and recorded_train[k] != v]
    return diffs


def saved_flow_matches(folder: str | Path, config: FlowConfig, train: TrainConfig, zoo: Zoo) -> bool:
    """Whether ``folder`` holds a finished flow trained with ``config`` and ``train`` on a zoo like ``zoo`` (same
    task, number of checkpoints and split), so that loading it gives what :func:`train_flow` would train.

    ``aligned`` (set by training) and ``compile`` (speed only) are not compared; a folder trained before a
    training setting was recorded does not match.
    """
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        return False
    try:
        meta = json.loads(cfg_path.read_text())
        recorded = meta.get("train", {})
        diffs = _setting_differences(meta["config"], recorded, config, train, may_differ=frozenset({"compile"}))
    except (ValueError, KeyError, TypeError):
        return False
    if (diffs or meta.get("zoo_task") != zoo.task or meta.get("zoo_checkpoints") != len(zoo)
            or meta.get("zoo_data_seed", 0) != zoo.data_seed):
        return False
    return all(key in recorded for key in ("steps", "batch_size", "lr", "coupling", "align", "seed"))


def _tail_mean(losses: list[float], k: int = 100) -> float | None:
    tail = losses[-k:]
    return sum(tail) / len(tail) if tail else None


# ------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(out: Path, step: int, losses: list[float], flow: WeightFlow, ema: dict[str, Tensor],
                     opt: torch.optim.Optimizer, gen: torch.Generator, train: TrainConfig) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()}
    sd = opt.state_dict()
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    atomic_write_bytes(out / CHECKPOINT, save(tensors))
    atomic_write_json(out / CHECKPOINT_META, {"step": step, "param_groups": sd["param_groups"],
                                              "train": dataclasses.asdict(train), "config": flow.config.to_dict()})


#: training settings a resumed run may change: the budget, the checkpoint cadence and how the field runs
_RESUME_MAY_CHANGE = frozenset({"steps", "checkpoint_every", "compile", "precision"})


def _check_resume(out: Path, meta: dict, flow: WeightFlow, train: TrainConfig) -> None:
    """Raise a ``ValueError`` naming every setting in which this run differs from the one that wrote the checkpoint
    (a resumed run must be the same run to continue to the same result)."""
    try:  # "config" is absent in checkpoints written before it was recorded
        diffs = _setting_differences(meta.get("config"), meta.get("train", {}), flow.config, train,
                                     may_differ=_RESUME_MAY_CHANGE)
    except (KeyError, TypeError) as e:
        raise ValueError(f"cannot resume from {out}: checkpoint metadata is corrupt ({e!r})") from e
    if diffs:
        raise ValueError(f"cannot resume from {out}: its checkpoint was written with {', '.join(diffs)}; pass the "
                         "original settings to continue it (defaults can change: `metaflow-ws tasks` shows a task's "
                         "[flow] defaults), or train into a new folder")


def _load_checkpoint(out: Path, flow: WeightFlow, ema: dict[str, Tensor], opt: torch.optim.Optimizer,
                     gen: torch.Generator, train: TrainConfig) -> tuple[int, list[float]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load((out / CHECKPOINT).read_bytes())
        meta = json.loads((out / CHECKPOINT_META).read_text())
    except (SafetensorError, json.JSONDecodeError, FileNotFoundError) as e:
        raise ValueError(f"cannot resume from {out}: checkpoint is corrupt or incomplete ({e})") from e
    _check_resume(out, meta, flow, train)
    dev = next(flow.parameters()).device
    flow.load_state_dict({k[6:]: v.to(dev) for k, v in tensors.items() if k.startswith("model.")})
    for k, v in tensors.items():
        if k.startswith("ema."):
            ema[k[4:]].copy_(v.to(dev))
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name == "step" else v.to(dev)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    gen.set_state(tensors["rng"])
    return int(meta["step"]), tensors["losses"].tolist()
