"""The task-conditioned flow as a few-shot method (``metaflow-ws fewshot --methods flow``).

Meta-training, in three stages:

1. **Family zoo.** ``tasks`` meta-training tasks are drawn from the family's ``train`` stream with
   ``task_points`` examples each; one network per task is trained on them with the family task's recipe
   (Adam, vmapped over all tasks at once by :func:`~metaflow_ws.train.population.fit_population`), all from one
   shared initialisation so that the family's weights vary smoothly with the task. The last ``keep``
   checkpoints of every network form the zoo.
2. **Conditional flow.** A Euclidean weight flow whose Relational Transformer is FiLM-conditioned on a Deep Sets
   embedding of a support set (:class:`~metaflow_ws.models.SetEncoder`) is trained on the zoo; every step
   embeds a fresh support set of K ~ U{lo..hi} examples of each network's own task, so encoder and vector field
   learn together. The field is anchored on the shared initialization (``FlowConfig.anchor``: the zoo lives in
   its permutation basin, so the ``independent`` coupling is right) and preconditioned
   (``FlowConfig.precondition``). ``query_weight > 0`` adds the
   meta-training loss on query sets of networks produced by a differentiable few-step sampler.
3. **Proposals.** For a new task: embed its support set, integrate the flow from prior draws → candidate
   networks (no gradient step); the protocol keeps the best on the support set and fine-tunes with plain SGD.

Budget: the flow takes ``min(iterations, flow_steps)`` optimizer steps, so it never gets more steps than the
gradient-based meta-learners' meta-iterations; the zoo's training time is counted in its wall time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaflow_ws.fewshot.baselines import MetaConfig, register_method
from metaflow_ws.fewshot.episodes import Family, stream_generator
from metaflow_ws.fewshot.protocol import Method
from metaflow_ws.flows.flow import FlowConfig, WeightFlow
from metaflow_ws.flows.sampling import SampleConfig, sample
from metaflow_ws.flows.train import SupportSets, TrainConfig, train_flow
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import Params

__all__ = ["FlowMethod", "FlowMethodConfig"]


@dataclass(frozen=True)
class FlowMethodConfig:
    """Settings of the task-conditioned flow method (the defaults are what ``metaflow-ws fewshot`` runs)."""

    tasks: int = 2000  # meta-training tasks in the family zoo
    task_points: int = 100  # examples per meta-training task (the networks' training data, support draws;
    #                         split evenly over the classes of an N-way family)
    net_epochs: int = 300  # target-network training (Adam at the family task's recipe)
    net_lr: float = 1e-2
    net_batch: int = 25
    keep: int = 3  # last checkpoints of every network kept in the zoo
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
    support_sizes: tuple[int, int] = (5, 20)
    query_weight: float = 0.0
    query_steps: int = 4
    #: Euler steps of a proposal; 2 was best of {1, 2, 4, 8, 32} on 200 validation tasks (test stream of seed 1,
    #: disjoint from the reported seed-0 test set), with 1 and with 8 candidates
    sample_steps: int = 2

    def __post_init__(self) -> None:
        for k in ("tasks", "task_points", "net_epochs", "keep", "flow_steps", "sample_steps"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"flow method: {k} must be ≥ 1; got {getattr(self, k)}")
        object.__setattr__(self, "support_sizes", tuple(int(v) for v in self.support_sizes))


class FlowMethod(Method):
    """Few-shot learner that samples initial networks from a task-conditioned weight flow."""

    name = "flow"
    settings_class = FlowMethodConfig

    def __init__(self, family: Family, config: MetaConfig | None = None, *, device: torch.device | str = "cpu",
                 seed: int = 0, settings: FlowMethodConfig | None = None) -> None:
        self.family, self.spec, self.kind = family, family.spec, family.kind
        self.meta = config or MetaConfig()
        self.settings = settings or FlowMethodConfig()
        self.device, self.seed = torch.device(device), int(seed)
        s = self.settings
        x_dim, y_dim = self.spec.in_features, self.spec.out_features
        self.flow_config = FlowConfig(flow="euclidean", widths=self.spec.widths, activation=self.spec.activation,
                                      task=family.name, prior_std=s.prior_std, d_model=s.d_model,
                                      num_layers=s.num_layers, cond_dim=s.cond_dim, anchor=s.anchor,
                                      precondition=s.precondition,
                                      encoder={"x_dim": x_dim, "y_dim": y_dim})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.flow = WeightFlow(self.flow_config).to(self.device)

    # ------------------------------------------------------------------------------------ meta-training
    def family_zoo(self, generator: torch.Generator) -> tuple[Zoo, SupportSets, dict[str, Any]]:
        """Stage 1: networks trained on ``tasks`` meta-training tasks (one shared init) and their data."""
        from metaflow_ws.train.optim import Adam
        from metaflow_ws.train.population import fit_population, steps_per_epoch

        s, spec = self.settings, self.spec
        t0 = time.perf_counter()
        shots = max(1, s.task_points // int(getattr(self.family, "n_way", 1)))  # classification: per class
        ep = self.family.sample(s.tasks, shots, 1, generator)
        x, y = ep.support_x.to(self.device, torch.float32), ep.support_y.to(self.device, torch.float32)
        init = spec.init(1, scheme="kaiming_uniform", generator=stream_generator(self.seed, "init"))
        flat = spec.flatten(init).expand(s.tasks, -1).clone().to(self.device)
        order = [torch.Generator().manual_seed(int(v)) for v in torch.randint(2**62, (s.tasks,), generator=generator)]
        spe = steps_per_epoch(x.shape[1], s.net_batch)
        total = s.net_epochs * spe
        keep = {total - i * spe for i in range(s.keep)}
        kept, steps = fit_population(spec, self.kind, flat, x, y, Adam(lr=s.net_lr), epochs=s.net_epochs,
                                     batch_size=s.net_batch, order_gens=order, keep=keep)
        k = len(steps)
        task_id = torch.arange(s.tasks).repeat_interleave(k)
        zoo = Zoo.from_flat(self.family.name, spec, kept.cpu(), run_id=task_id,
                            step=torch.tensor(steps, dtype=torch.int64).repeat(s.tasks),
                            metrics={"task_id": task_id.double()})
        from metaflow_ws.fewshot.protocol import per_task_loss

        fit = per_task_loss(spec, self.kind, spec.unflatten(kept.view(s.tasks, k, -1)[:, -1]), x, y)
        info = {"zoo_seconds": time.perf_counter() - t0, "zoo_networks": len(zoo),
                "zoo_train_loss_median": float(fit.median()), "zoo_train_loss_mean": float(fit.mean())}
        self.shared_init = init
        return zoo, SupportSets(x.cpu(), y.cpu(), task_id, self.kind), info

    def meta_train(self, family: Family, *, iterations: int | None = None, generator: torch.Generator,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        zoo, support, info = self.family_zoo(generator)
        if log is not None:
            log(f"flow: family zoo of {len(zoo)} networks over {s.tasks} tasks in {info['zoo_seconds']:.0f} s "
                f"(median train loss {info['zoo_train_loss_median']:.4f})")
        steps = min(int(iterations or self.meta.iterations), s.flow_steps)
        train = TrainConfig(steps=steps, batch_size=s.batch_size, lr=s.lr, coupling=s.coupling, align=False,
                            seed=self.seed, support_sizes=s.support_sizes, query_weight=s.query_weight,
                            query_steps=s.query_steps, checkpoint_every=max(steps, 1))
        every = max(1, steps // 10)

        def progress(step: int, total: int, loss: float, sps: float) -> None:
            if log is not None and (step % every == 0 or step == total):
                log(f"flow: step {step}/{total} loss {loss:.4f} ({sps:.1f} steps/s)")

        res = train_flow(zoo, self.flow_config, train, support=support, device=self.device, progress=progress,
                         anchor=self.shared_init if s.anchor else None)
        self.flow = res.flow
        return {"seconds": time.perf_counter() - t0, "flow_seconds": res.seconds, "flow_steps": steps,
                "final_flow_loss": res.final_loss, **info}

    # ---------------------------------------------------------------------------------------- protocol
    @torch.no_grad()
    def propose(self, support_x: Tensor, support_y: Tensor, n_candidates: int,
                generator: torch.Generator) -> Params:
        t, c = support_x.shape[0], max(1, int(n_candidates))
        flow = self.flow.eval()
        cond = flow.embed(support_x.to(self.device, torch.float32), support_y.to(self.device, torch.float32))
        cond = cond.repeat_interleave(c, 0)
        x0 = flow.sample_prior(t * c, generator=generator).to(self.device)
        x = sample(flow, t * c, SampleConfig(steps=self.settings.sample_steps), cond=cond, x0=x0)
        params = flow.decode(x)
        return {n: v.reshape(t, c, *v.shape[1:]) for n, v in params.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self.flow.state_dict().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
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
