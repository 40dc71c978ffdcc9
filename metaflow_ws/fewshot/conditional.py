"""The task-conditioned flow as a few-shot method (``metaflow-ws fewshot --methods flow``).

Meta-training, in three stages:

1. **Family zoo.** ``tasks`` meta-training tasks are drawn from the family's ``train`` stream with
   ``task_points`` examples each; one network per task is trained on them (vmapped over all tasks at once by
   :func:`~metaflow_ws.train.population.fit_population`), all from one shared initialisation so that the
   family's weights vary smoothly with the task. The shared initialisation is itself meta-learned
   (``zoo_init="maml"``: a short MAML run, ``zoo_init_iterations`` meta-iterations of the shared budget): from a
   random init the networks of neighbouring tasks end up far apart in weight space — averaging the weights of the
   2 nearest meta-training tasks' networks breaks the function — so the flow would have to regress a map that is
   not smooth; fine-tuned from the MAML init they stay in one basin, where such averages still fit (a family can
   choose otherwise: ``digits`` starts from a random init, see ``DigitsFewShot.method_defaults``). The networks
   are trained with the protocol's own fine-tuning optimizer (plain SGD at the inner learning rate) on
   minibatches as small as the smallest support set: gradient descent at step size η settles only where the loss
   is flatter than about 2/η, so the zoo's networks — and the flow's proposals — stay stable when the protocol
   fine-tunes them on a handful of points, where Adam-trained zoo networks blow up on some tasks.
   ``python benchmarks/bench_family_zoo.py`` measures both effects side by side. The last ``keep`` checkpoints of
   every network form the zoo.
2. **Conditional flow.** A Euclidean weight flow whose Relational Transformer is FiLM-conditioned on a Deep Sets
   embedding of a support set (:class:`~metaflow_ws.models.SetEncoder`) is trained on the zoo; every step
   embeds a fresh support set of K ~ U{lo..hi} examples of each network's own task, so encoder and vector field
   learn together. The field is anchored on the shared initialization (``FlowConfig.anchor``: the zoo lives in
   its permutation basin, so the ``independent`` coupling is right) and preconditioned
   (``FlowConfig.precondition``). With ``residual`` (the default) it models each network's change from the
   shared initialisation, ``w − init``, at unit scale per parameter block: SGD-trained networks move only a few
   per cent of the init's norm, and a flow over the raw weights learned to return the init itself (sinusoid
   query MSE 2.9 before fine-tuning, as MAML's init, against 0.15 with ``residual``). ``query_weight > 0`` adds
   the meta-training loss on query sets of the networks (``init + sample`` with ``residual``) a differentiable
   few-step sampler produces.
3. **Proposals.** For a new task: embed its support set, integrate the flow from prior draws and add the shared
   initialisation → candidate networks (no gradient step); the protocol keeps the best on the support set and
   fine-tunes with plain SGD.

Budget: the flow takes ``min(iterations, flow_steps)`` optimizer steps, so it never gets more steps than the
gradient-based meta-learners' meta-iterations; the MAML run of the shared initialisation and the zoo's training
are counted in its wall time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaflow_ws.fewshot.baselines import MetaConfig, method_settings, register_method
from metaflow_ws.fewshot.episodes import Family, stream_generator
from metaflow_ws.fewshot.protocol import Method
from metaflow_ws.flows.flow import FlowConfig, WeightFlow
from metaflow_ws.flows.sampling import SampleConfig, sample
from metaflow_ws.flows.train import SupportSets, TrainConfig, train_flow
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import Params

__all__ = ["FlowMethod", "FlowMethodConfig", "zoo_inits"]


def zoo_inits() -> tuple[str, ...]:
    """Shared initialisations a family zoo can start from: ``"random"``, or the meta-parameters of any registered
    gradient meta-learner (read from the method registry, so a newly registered learner counts)."""
    from metaflow_ws.fewshot.baselines import METHODS, GradientMetaLearner

    return ("random", *(n for n, f in METHODS.items() if isinstance(f, type) and issubclass(f, GradientMetaLearner)))


#: prefix of the shared initialisation's tensors in a residual flow method's saved state
INIT_PREFIX = "zoo_init."


@dataclass(frozen=True)
class FlowMethodConfig:
    """Settings of the task-conditioned flow method (the defaults are what ``metaflow-ws fewshot`` runs)."""

    tasks: int = 2000  # meta-training tasks in the family zoo
    task_points: int = 100  # examples per meta-training task (the networks' training data, support draws;
    #                         split evenly over the classes of an N-way family)
    net_epochs: int = 100  # target-network training
    net_optimizer: str = "sgd"  # "sgd" or "adam"
    net_lr: float = 0.0  # 0: the fine-tuning learning rate (``MetaConfig.inner_lr``)
    net_batch: int = 5
    keep: int = 3  # last checkpoints of every network kept in the zoo
    #: shared initialisation of the zoo (one of :func:`zoo_inits`): ``"random"`` (Kaiming uniform) or the
    #: meta-parameters of a gradient meta-learner trained for ``zoo_init_iterations`` meta-iterations with the
    #: baselines' budget settings (meta-batch, inner and outer learning rates)
    zoo_init: str = "maml"
    zoo_init_iterations: int = 2000
    flow_steps: int = 4000
    batch_size: int = 32
    lr: float = 2e-3
    d_model: int = 32
    num_layers: int = 3
    cond_dim: int = 32
    prior_std: float = 0.316
    coupling: str = "independent"
    #: feed the shared initialization to the vector field (``FlowConfig.anchor``): the family's networks share
    #: its permutation basin, which an equivariant field cannot see otherwise (it then needs ``coupling="perm"``)
    anchor: bool = True
    #: EDM-style preconditioning of the x1 prediction (``FlowConfig.precondition``)
    precondition: bool = True
    #: path noise (``FlowConfig.sigma``); the few-shot results were measured without it
    sigma: float = 0.0
    #: the flow models each network's change from the shared initialisation, ``w − init``, at unit scale per
    #: parameter block (the anchor, scaled to unit RMS, still tells the field which neuron is which); proposals
    #: are ``init + sample``. Without it, networks that moved little from the init reach the field as the init
    #: plus a few per cent, and the flow learns to return the init
    residual: bool = True
    support_sizes: tuple[int, int] = (5, 20)
    query_weight: float = 0.0
    query_steps: int = 4
    #: Euler steps of a proposal; 2 was best of {1, 2, 4, 8, 32} on 200 validation tasks (test stream of seed 1,
    #: disjoint from the reported seed-0 test set), with 1 and with 8 candidates
    sample_steps: int = 2

    def __post_init__(self) -> None:
        for k in ("tasks", "task_points", "net_epochs", "net_batch", "keep", "flow_steps", "sample_steps",
                  "zoo_init_iterations"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"flow method: {k} must be ≥ 1; got {getattr(self, k)}")
        object.__setattr__(self, "support_sizes", tuple(int(v) for v in self.support_sizes))
        if self.net_optimizer not in ("sgd", "adam"):
            raise ValueError(f"flow method: net_optimizer must be 'sgd' or 'adam'; got {self.net_optimizer!r}")
        if not self.net_lr >= 0:
            raise ValueError(f"flow method: net_lr must be ≥ 0 (0: the fine-tuning learning rate); got {self.net_lr}")
        if self.zoo_init not in (inits := zoo_inits()):
            raise ValueError(f"flow method: zoo_init must be one of {', '.join(inits)}; got {self.zoo_init!r}")
        if self.residual and not self.anchor:
            raise ValueError("flow method: residual=true needs anchor=true (the field must see the shared init)")


class FlowMethod(Method):
    """Few-shot learner that samples initial networks from a task-conditioned weight flow."""

    name = "flow"
    settings_class = FlowMethodConfig

    def __init__(self, family: Family, config: MetaConfig | None = None, *, device: torch.device | str = "cpu",
                 seed: int = 0, settings: FlowMethodConfig | None = None) -> None:
        self.family, self.spec, self.kind = family, family.spec, family.kind
        self.meta = config or MetaConfig(inner_lr=float(getattr(family, "lr", MetaConfig.inner_lr)))
        self.settings = settings or method_settings(self.name, {}, family)  # the family's defaults, if any
        self.device, self.seed = torch.device(device), int(seed)
        s = self.settings
        #: the family zoo's shared initial network ``{name: [1, ...]}`` (set by :meth:`family_zoo` or a loaded state)
        self.shared_init: Params | None = None
        x_dim, y_dim = self.spec.in_features, self.spec.out_features
        self.flow_config = FlowConfig(flow="euclidean", widths=self.spec.widths, activation=self.spec.activation,
                                      task=family.name, prior_std=s.prior_std, d_model=s.d_model,
                                      num_layers=s.num_layers, cond_dim=s.cond_dim, anchor=s.anchor,
                                      precondition=s.precondition, sigma=s.sigma,
                                      encoder={"x_dim": x_dim, "y_dim": y_dim})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.flow = WeightFlow(self.flow_config).to(self.device)

    # ------------------------------------------------------------------------------------ meta-training
    def shared_initialization(self, generator: torch.Generator) -> tuple[Params, dict[str, Any]]:
        """The zoo's shared initial network ``{name: [1, ...]}`` (``settings.zoo_init``) and what it cost.

        A meta-learned init draws its meta-training episodes from ``generator`` (the ``train`` stream)."""
        s = self.settings
        if s.zoo_init == "random":
            init = self.spec.init(1, scheme="kaiming_uniform", generator=stream_generator(self.seed, "init"))
            return init, {"zoo_init": "random"}
        from metaflow_ws.fewshot.baselines import get_method

        learner = get_method(s.zoo_init, self.family, dataclasses.replace(self.meta, iterations=s.zoo_init_iterations),
                             device=self.device, seed=self.seed)
        res = learner.meta_train(self.family, generator=generator)
        init = {n: v.detach().cpu().unsqueeze(0) for n, v in learner.theta(learner.params).items()}  # (1, ...)
        return init, {"zoo_init": s.zoo_init, "zoo_init_iterations": s.zoo_init_iterations,
                      "zoo_init_seconds": res["seconds"], "zoo_init_meta_loss": res["final_meta_loss"]}

    def family_zoo(self, generator: torch.Generator) -> tuple[Zoo, SupportSets, dict[str, Any]]:
        """Stage 1: networks trained on ``tasks`` meta-training tasks (one shared init) and their data.

        The zoo's metrics hold every network's ``task_id`` and its task's parameters ``task_param_0..P-1``
        (:attr:`Episodes.task_params`; sinusoid: amplitude, phase)."""
        from metaflow_ws.train.optim import SGD, Adam
        from metaflow_ws.train.population import fit_population, steps_per_epoch

        s, spec = self.settings, self.spec
        t0 = time.perf_counter()
        init, init_info = self.shared_initialization(generator)
        shots = max(1, s.task_points // int(getattr(self.family, "n_way", 1)))  # classification: per class
        ep = self.family.sample(s.tasks, shots, 1, generator)
        x, y = ep.support_x.to(self.device, torch.float32), ep.support_y.to(self.device, torch.float32)
        flat = spec.flatten(init).expand(s.tasks, -1).clone().to(self.device)
        order = [torch.Generator().manual_seed(int(v)) for v in torch.randint(2**62, (s.tasks,), generator=generator)]
        spe = steps_per_epoch(x.shape[1], s.net_batch)
        total = s.net_epochs * spe
        keep = {total - i * spe for i in range(s.keep)}
        lr = s.net_lr or self.meta.inner_lr
        opt = SGD(lr=lr) if s.net_optimizer == "sgd" else Adam(lr=lr)
        kept, steps = fit_population(spec, self.kind, flat, x, y, opt, epochs=s.net_epochs,
                                     batch_size=s.net_batch, order_gens=order, keep=keep)
        k = len(steps)
        task_id = torch.arange(s.tasks).repeat_interleave(k)
        zoo = Zoo.from_flat(self.family.name, spec, kept.cpu(), run_id=task_id,
                            step=torch.tensor(steps, dtype=torch.int64).repeat(s.tasks),
                            metrics={"task_id": task_id.double(),
                                     **{f"task_param_{i}": v.double().repeat_interleave(k)
                                        for i, v in enumerate(ep.task_params.cpu().unbind(1))}})
        from metaflow_ws.fewshot.protocol import per_task_loss

        fit = per_task_loss(spec, self.kind, spec.unflatten(kept.view(s.tasks, k, -1)[:, -1]), x, y)
        info = {"zoo_seconds": time.perf_counter() - t0, **init_info, "zoo_networks": len(zoo),
                "zoo_train_loss_median": float(fit.median()), "zoo_train_loss_mean": float(fit.mean())}
        self.shared_init = init
        return zoo, SupportSets(x.cpu(), y.cpu(), task_id, self.kind), info

    def meta_train(self, family: Family, *, iterations: int | None = None, generator: torch.Generator,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        zoo, support, info = self.family_zoo(generator)
        if log is not None:
            init = ("random init" if s.zoo_init == "random" else
                    f"{s.zoo_init} init ({s.zoo_init_iterations} iterations, {info['zoo_init_seconds']:.0f} s)")
            log(f"flow: family zoo of {len(zoo)} networks over {s.tasks} tasks from a shared {init} in "
                f"{info['zoo_seconds']:.0f} s (median train loss {info['zoo_train_loss_median']:.4f})")
        steps = min(int(iterations or self.meta.iterations), s.flow_steps)
        train = TrainConfig(steps=steps, batch_size=s.batch_size, lr=s.lr, coupling=s.coupling, align=False,
                            seed=self.seed, support_sizes=s.support_sizes, query_weight=s.query_weight,
                            query_steps=s.query_steps, checkpoint_every=max(steps, 1))
        every = max(1, steps // 10)

        def progress(step: int, total: int, loss: float, sps: float) -> None:
            if log is not None and (step % every == 0 or step == total):
                log(f"flow: step {step}/{total} loss {loss:.4f} ({sps:.1f} steps/s)")

        anchor: Params | Tensor | None = self.shared_init if s.anchor else None
        offset = None
        if s.residual:  # the query loss (if any) scores init + sample; the init moves to the device once
            zoo, anchor = self._residual_zoo(zoo)
            offset = {n: v.to(self.device) for n, v in self.shared_init.items()}
        res = train_flow(zoo, self.flow_config, train, support=support, device=self.device, progress=progress,
                         anchor=anchor, query_offset=offset)
        self.flow = res.flow
        return {"seconds": time.perf_counter() - t0, "flow_seconds": res.seconds, "flow_steps": steps,
                "final_flow_loss": res.final_loss, **info}

    def _residual_zoo(self, zoo: Zoo) -> tuple[Zoo, Tensor]:
        """``w − init`` for every network, and anchor coordinates that reach the field at unit RMS per block
        (the flow divides its inputs by the residuals' per-block RMS)."""
        from metaflow_ws.flows.flow import block_rms

        init = self.spec.flatten(self.shared_init)  # (1, D)
        delta = Zoo.from_flat(zoo.task, self.spec, zoo.flat() - init, run_id=zoo.run_id, step=zoo.step,
                              metrics=zoo.metrics)
        a = self.flow.encode(self.shared_init)  # (1, dim)
        anchor = a * block_rms(self.spec, self.flow.encode(delta.params)) / block_rms(self.spec, a)
        return delta, anchor.reshape(-1)

    # ---------------------------------------------------------------------------------------- protocol
    @torch.no_grad()
    def propose(self, support_x: Tensor, support_y: Tensor, n_candidates: int,
                generator: torch.Generator) -> Params:
        t, c = support_x.shape[0], max(1, int(n_candidates))
        flow = self.flow.eval()
        cond = flow.embed(support_x.to(self.device, torch.float32), support_y.to(self.device, torch.float32))
        cond = cond.repeat_interleave(c, 0)
        x0 = flow.sample_prior(t * c, generator=generator).to(self.device)
        x = sample(flow, t * c, SampleConfig(steps=self.settings.sample_steps, rho=1.0),  # uniform grid, as measured
                   cond=cond, x0=x0)
        params = flow.decode(x)
        if self.settings.residual:
            if self.shared_init is None:
                raise RuntimeError("flow: meta-train the method or load a saved state before proposing")
            params = {n: v + self.shared_init[n].to(v) for n, v in params.items()}
        return {n: v.reshape(t, c, *v.shape[1:]) for n, v in params.items()}

    def state_dict(self) -> dict[str, Tensor]:
        state = {k: v.detach() for k, v in self.flow.state_dict().items()}
        if self.settings.residual and self.shared_init is not None:  # proposals are init + sample
            state |= {f"{INIT_PREFIX}{n}": v.detach() for n, v in self.shared_init.items()}
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        init = {k[len(INIT_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(INIT_PREFIX)}
        if self.settings.residual:
            if set(init) != set(self.spec.names):
                raise ValueError("flow: saved state lacks the shared initialisation a residual flow adds its samples "
                                 "to; retrain without --reuse")
            self.shared_init = {n: v.to(self.device) for n, v in init.items()}
        try:
            missing, unexpected = self.flow.load_state_dict({k: v.to(self.device) for k, v in state.items()},
                                                            strict=False)
        except RuntimeError as e:  # shape mismatch: the state was saved with other settings
            raise ValueError(f"flow: saved state was made with other model settings; retrain without --reuse ({e})"
                             ) from None
        if missing or unexpected:
            raise ValueError(f"flow: saved state does not match this flow (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); retrain without --reuse")

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "family": self.family.describe(), "seed": self.seed,
                "settings": dataclasses.asdict(self.settings), "flow": self.flow_config.to_dict()}


register_method("flow", FlowMethod)
