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
from metaflow_ws.flows.flow import FlowConfig, WeightFlow
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json
from metaflow_ws.io.zoo import Zoo

__all__ = ["TrainConfig", "TrainResult", "beta12", "flow_matching_loss", "train_flow"]

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_META = "checkpoint.json"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train_flow` (the CLI's defaults)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    warmup: int = 100
    coupling: str = "ot"
    align: bool = True
    align_method: str = "weight"
    seed: int = 0
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be ≥ 1; got {getattr(self, k)}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay}")


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
    """Mean squared error of the x1 prediction (in per-block scaled units) at x_t on the path from x0 to x1."""
    x_t = flow.path_manifold.interpolate(x0, x1, t)
    if sigma > 0:
        x_t = x_t + sigma * torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
    x1_hat = flow.predict_x1(x_t, t, cond)
    return (((x1_hat - x1) / flow.scale) ** 2).mean()


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
) -> TrainResult:
    """Train a flow of ``config`` on the networks of ``zoo``; returns the flow with EMA weights.

    With ``out``, checkpoints go to ``out/checkpoint.safetensors`` every ``checkpoint_every`` steps (atomic) and
    the final flow to ``out/`` (``config.json`` + ``flow.safetensors``); ``resume=True`` continues from the last
    checkpoint and gives the same result as an uninterrupted run. ``progress(step, total, loss, steps_per_s)``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if zoo.spec != config.spec:
        raise ValueError(f"the zoo holds {zoo.spec.describe()} networks but the flow config is for "
                         f"{config.spec.describe()}")
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
    flow.set_scale_from(x1_all)
    coupling = make_coupling(train.coupling, flow.path_manifold if config.flow == "geometric" else None)
    opt = torch.optim.AdamW(flow.field.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    ema = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    gen = torch.Generator().manual_seed(train.seed + 1)
    losses: list[float] = []
    start = 0
    out = Path(out) if out is not None else None
    if resume:
        if out is None or not (out / CHECKPOINT).is_file():
            raise FileNotFoundError(f"nothing to resume: {out}/{CHECKPOINT} does not exist")
        start, losses = _load_checkpoint(out, flow, ema, opt, gen)

    n = x1_all.shape[0]
    t_loop = time.perf_counter()
    flow.train()
    for step in range(start, train.steps):
        for g in opt.param_groups:
            g["lr"] = train.lr * _lr_factor(step, train)
        idx = torch.randint(n, (train.batch_size,), generator=gen).to(device)
        x1 = x1_all[idx]
        x0 = flow.sample_prior(train.batch_size, generator=gen)
        x0 = coupling(x0, x1)
        t = beta12(train.batch_size, gen).to(device)
        loss = flow_matching_loss(flow, x0, x1, t, sigma=config.sigma, generator=gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"flow training diverged at step {step + 1} (loss={float(loss.detach())}); lower --lr "
                                     f"(now {train.lr}) or check the zoo for extreme weights")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.field.parameters(), train.grad_clip)
        opt.step()
        decay = min(train.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in flow.state_dict().items():
                if v.is_floating_point():
                    ema[k].lerp_(v, 1 - decay)
                else:
                    ema[k].copy_(v)
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
    if out is not None:
        flow.save_pretrained(out, extra={"train": dataclasses.asdict(train), "zoo_task": zoo.task,
                                         "zoo_checkpoints": len(zoo), "final_loss": result.final_loss,
                                         "seconds": result.seconds})
    return result


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
                                              "train": dataclasses.asdict(train)})


def _load_checkpoint(out: Path, flow: WeightFlow, ema: dict[str, Tensor], opt: torch.optim.Optimizer,
                     gen: torch.Generator) -> tuple[int, list[float]]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load((out / CHECKPOINT).read_bytes())
        meta = json.loads((out / CHECKPOINT_META).read_text())
    except (SafetensorError, json.JSONDecodeError, FileNotFoundError) as e:
        raise ValueError(f"cannot resume from {out}: checkpoint is corrupt or incomplete ({e})") from e
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
