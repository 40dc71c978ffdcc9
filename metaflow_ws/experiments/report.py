"""The evaluation protocol behind ``metaflow-ws report``: zoo → flows → samples → metrics, baselines, sweeps,
likelihood detection → ``README.md`` + ``results.json`` + PNG figures in one folder.

Stages (each timed): train or load the zoo; train (or, with ``reuse``, load) the three flows (aligned, with
the ``coupling`` of ``metaflow-ws train``'s default, ``ot-perm``; the headline budget) and, for
``breast_cancer``, the thesis's Table 4.1 grid of the three flows × {unaligned, aligned, aligned+OT} plus an
aligned+OT+perm column; sample every flow; evaluate samples and baselines on the test split
(accuracy, NLL, ECE, Brier, functional diversity and disagreement, novelty, BMA curves); sweep integration
steps, guidance strength and stochastic noise; loss barriers before/after alignment; likelihood AUROC of
held-out trained networks against random-init and corrupted ones. Every file is written atomically; flows are
kept under ``OUT/flows/`` so that ``reuse=True`` skips retraining them.

Seeds: zoo ``seed``; held-out trained networks ``seed + 1``; flow training ``seed``; sampling and baselines
fixed offsets of ``seed`` (listed in ``results.json``). The best flow is chosen on the validation split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metaflow_ws.experiments.flows_table import FlowRun
from metaflow_ws.flows.flow import SIGMA, check_path_noise
from metaflow_ws.flows.train import TrainConfig, check_lr, task_flow_defaults
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from metaflow_ws.io.zoo import Zoo
from metaflow_ws.nets.spec import Params

__all__ = ["ReportConfig", "run_report", "write_gaussian_toy"]

FLOW_NAMES = ("euclidean", "normalized", "geometric")
#: the thesis's Table 4.1 settings (label, coupling, align) and our equivariant OT coupling (Klein et al. 2023)
GRID_SETTINGS = (("unaligned", "independent", False), ("aligned", "independent", True), ("aligned+OT", "ot", True),
                 ("aligned+OT+perm", "ot-perm", True))
#: relative weight-noise scale of the "noisy trained" negatives of the likelihood detection
CORRUPTION_NOISE = 0.25


@dataclass(frozen=True)
class ReportConfig:
    """Budgets and settings of one report (the CLI fills it; :meth:`quick_budget` gives the ``--quick`` budget)."""

    task: str
    out_dir: Path
    quick: bool = False
    zoo_path: Path | None = None
    runs: int | None = None
    epochs: int | None = None
    seed: int = 0
    steps: int = 3000
    #: training steps of the Table 4.1 grid (breast_cancer); None → ``steps``
    ablation_steps: int | None = None
    #: coupling of the headline flows (all aligned); see :data:`metaflow_ws.flows.COUPLINGS`
    coupling: str = "ot-perm"
    #: train the flows × {unaligned, aligned, aligned+OT, aligned+OT+perm} grid; None → only for breast_cancer
    ablation: bool | None = None
    #: field size and peak learning rate of every flow; None → the task's ``[flow]`` table, else the library's
    #: defaults (:func:`metaflow_ws.flows.task_flow_defaults`), as ``metaflow-ws train``
    d_model: int | None = None
    num_layers: int | None = None
    #: path noise of every flow (``FlowConfig.sigma``, ``train --path-noise``); 0 = plain flow matching
    path_noise: float = SIGMA
    lr: float | None = None
    batch_size: int = 32
    #: train the flows with ``torch.compile`` (speed only: flows trained either way are reused)
    compile: bool = False
    #: precision of the field during flow training (``TrainConfig.precision``: ``"fp32"`` or ``"bf16"``)
    precision: str = "fp32"
    samples: int = 100
    sample_steps: int = 64
    solver: str = "euler"
    #: time grid of every draw but the time-grid sweep (``SampleConfig.rho``; None → the sampler's default)
    rho: float | None = None
    bma_max: int = 32
    bma_orderings: int = 10
    step_sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    guidance_sweep: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    noise_sweep: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.5)
    rho_sweep: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    sweep_samples: int = 50
    guidance_points: int = 512
    lik_networks: int = 32
    lik_steps: int = 16
    lik_estimator: str = "hutchinson"
    lik_probes: int = 2
    barrier_pairs: int = 100
    average_k: tuple[int, ...] = (2, 5)
    reuse: bool = False
    #: draw the PNG figures (off only to save time in tests)
    figures: bool = True
    device: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.zoo_path is not None:
            object.__setattr__(self, "zoo_path", Path(self.zoo_path))
        for k, v in task_flow_defaults(self.task).items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        from metaflow_ws.flows import SampleConfig

        object.__setattr__(self, "rho", SampleConfig(rho=SampleConfig.rho if self.rho is None else self.rho).rho)
        for k in ("steps", "samples", "sample_steps", "bma_max", "sweep_samples", "lik_networks", "lik_steps",
                  "lik_probes", "barrier_pairs", "d_model", "num_layers", "batch_size", "bma_orderings"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be ≥ 1; got {getattr(self, k)}")
        if self.samples < 2:
            raise ValueError(f"samples must be ≥ 2 (diversity needs pairs); got {self.samples}")
        from metaflow_ws.flows.couplings import COUPLINGS

        if self.coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {self.coupling!r}; choose one of {', '.join(COUPLINGS)}")
        check_path_noise(self.path_noise, "path_noise")
        check_lr(self.lr, "lr")
        if self.lik_estimator not in ("exact", "hutchinson"):
            raise ValueError(f"lik_estimator must be 'exact' or 'hutchinson'; got {self.lik_estimator!r}")

    @property
    def grid_steps(self) -> int:
        return self.steps if self.ablation_steps is None else int(self.ablation_steps)

    @classmethod
    def quick_budget(cls, task: str, out_dir: str | Path, **overrides: Any) -> ReportConfig:
        """The ``--quick`` budget: a small zoo, tiny flows trained for a few hundred steps, few samples."""
        base: dict[str, Any] = dict(
            quick=True, runs=10, steps=300, d_model=16, num_layers=2, samples=32, sample_steps=16,
            step_sweep=(1, 4, 16, 32), guidance_sweep=(0.0, 0.1, 1.0), noise_sweep=(0.0, 0.2), rho_sweep=(1.0, 3.0),
            sweep_samples=16,
            guidance_points=256, lik_networks=12, lik_steps=8, lik_probes=1, barrier_pairs=20, bma_orderings=4,
            average_k=(2,),
        )
        base.update(overrides)
        return cls(task=task, out_dir=Path(out_dir), **base)


@dataclass
class _Clock:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def _folder_name(run: FlowRun, steps: int) -> str:
    return f"{run.flow}_{run.coupling}_{'aligned' if run.align else 'unaligned'}_{steps}"


def _argmax_finite(scores: dict[str, float]) -> str:
    """The key with the highest finite score (NaN / inf count as lowest; ties go to the first key)."""
    if not scores:
        raise ValueError("no flows to choose from")
    return max(scores, key=lambda k: scores[k] if math.isfinite(scores[k]) else -math.inf)


def _mean_std(t: Tensor) -> tuple[float, float]:
    t = t.double()
    return float(t.mean()), (float(t.std(unbiased=False)) if t.numel() > 1 else 0.0)


# ============================================================================================= entry point
def run_report(cfg: ReportConfig, *, command: str | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the protocol of ``cfg`` and write ``README.md``, ``results.json`` and ``figures/*.png`` into
    ``cfg.out_dir``. Returns the ``results.json`` dict. ``command`` is recorded verbatim in the README."""
    from metaflow_ws.tasks.registry import get_task

    log = log or (lambda s: None)
    task = get_task(cfg.task)
    command = command or f"metaflow-ws report --task {cfg.task}{' --quick' if cfg.quick else ''}"
    if task.kind == "synthetic":
        if task.name != "gaussian_toy":
            raise ValueError(f"task {task.name!r} is a synthetic weight family; the report covers classification "
                             "tasks and gaussian_toy")
        return write_gaussian_toy(cfg, command=command, log=log)
    if task.kind != "classification":
        raise ValueError(f"the report covers classification tasks (and gaussian_toy); {task.name!r} is "
                         f"{task.kind}")
    return _Report(cfg, task, command, log).run()


def write_gaussian_toy(cfg: ReportConfig, *, command: str, log: Callable[[str], None]) -> dict[str, Any]:
    """``gaussian_toy``: delegate to :func:`metaflow_ws.experiments.gaussian_toy.run_gaussian_toy` and write its
    README section, figures and results."""
    try:
        from metaflow_ws.experiments.gaussian_toy import run_gaussian_toy
    except ImportError as e:
        raise ValueError("the gaussian_toy reproduction is not available in this installation "
                         "(metaflow_ws.experiments.gaussian_toy.run_gaussian_toy could not be imported: "
                         f"{e}); the other tasks' reports do not need it") from None
    t0 = time.perf_counter()
    log("gaussian_toy: running the reproduction ...")
    from metaflow_ws.errors import resolve_device

    res = run_gaussian_toy(cfg.out_dir, quick=cfg.quick, seed=cfg.seed, device=resolve_device(cfg.device))
    seconds = time.perf_counter() - t0
    figures = [Path(f) for f in res.get("figures", [])]
    head = _header(cfg, "gaussian_toy", command, seconds)
    figs = "\n".join(f"![{f.stem}]({_rel(f, cfg.out_dir)})" for f in figures)
    text = head + "\n" + res["markdown"].strip() + "\n" + (f"\n## Figures\n\n{figs}\n" if figs else "")
    results = {"command": command, "task": "gaussian_toy", "quick": cfg.quick, "seed": cfg.seed,
               "seconds": seconds, "figures": [_rel(f, cfg.out_dir) for f in figures], "results": res["results"],
               "environment": _environment()}
    atomic_write_json(cfg.out_dir / "results.json", _jsonable(results))
    atomic_write_text(cfg.out_dir / "README.md", text)
    return results


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def _path_noise(flow_info: dict[str, dict[str, Any]]) -> str:
    """``", path noise 0.3 (`train --path-noise`)"`` (the flows' ``FlowConfig.sigma``; every value if they
    differ), or ``""`` for results written before the flows recorded it."""
    values = sorted({fi["path_noise"] for fi in flow_info.values() if "path_noise" in fi})
    return f", path noise {' / '.join(f'{v:g}' for v in values)} (`train --path-noise`)" if values else ""


def _header(cfg: ReportConfig, name: str, command: str, seconds: float) -> str:
    lines = [f"# {name}: evaluation report", "", f"Written by `{command}` in {seconds / 60:.1f} min "
             f"(seed {cfg.seed}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)).", ""]
    if cfg.quick:
        lines += ["> **Quick run (`--quick`)**: tiny flows, few training steps and samples. These numbers check "
                  "that the pipeline works; they are **not** the real results — run without `--quick` for those.",
                  ""]
    return "\n".join(lines)


# ================================================================================================ report
class _Report:
    def __init__(self, cfg: ReportConfig, task, command: str, log: Callable[[str], None]) -> None:
        from metaflow_ws.errors import resolve_device

        self.cfg, self.task, self.command, self.log = cfg, task, command, log
        self.device = resolve_device(cfg.device)
        self.out = cfg.out_dir
        self.fig_dir = self.out / "figures"
        self.clock = _Clock()
        self.spec = task.spec
        self.results: dict[str, Any] = {"command": command, "task": task.name, "quick": cfg.quick,
                                        "config": _jsonable(dataclasses.asdict(cfg)), "environment": _environment()}
        self.figures: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.log(f"{self.task.name}: {stage} ...")
        try:
            yield
        finally:
            self.clock.add(stage, time.perf_counter() - t0)

    def _gen(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000 + offset)

    def _figure(self, name: str, draw: Callable[[], bytes], caption: str) -> None:
        if not self.cfg.figures:
            return
        atomic_write_bytes(self.fig_dir / f"{name}.png", draw())
        self.figures[name] = caption

    # ---------------------------------------------------------------------------------------- stages
    def run(self) -> dict[str, Any]:
        t_all = time.perf_counter()
        cfg = self.cfg
        with self._timed("zoo"):
            self._zoo()
        with self._timed("held-out trained networks"):
            self._heldout()
        with self._timed("flow training (or loading)"):
            self._flows()
        with self._timed("sampling"):
            self._sample_all()
        with self._timed("evaluation and baselines"):
            self._evaluate()
        with self._timed("sweeps: steps, guidance, noise, time grid"):
            self._sweeps()
        with self._timed("loss barriers"):
            self._barriers()
        with self._timed("likelihood detection"):
            self._likelihood()
        self._goals()
        seconds = time.perf_counter() - t_all
        self.results["seconds"] = seconds
        self.results["stage_seconds"] = dict(self.clock.stages)
        self.results["figures"] = {k: f"figures/{k}.png" for k in self.figures}
        self.results["seeds"] = {
            "zoo": cfg.seed, "held_out_networks": cfg.seed + 1, "flow_training": cfg.seed,
            "sampling": f"torch.Generator seeded {cfg.seed}*1000 + offset (100 samples, 200 steps sweep, "
                        "300 guidance, 400 noise, 500 baselines, 600 likelihood, 700 BMA orderings)",
            "data_split": self.zoo.data_seed,
        }
        atomic_write_json(self.out / "results.json", _jsonable(self.results))
        atomic_write_text(self.out / "README.md", self._markdown(seconds))
        return self.results

    def _zoo(self) -> None:
        from metaflow_ws.train import train_population

        cfg, task = self.cfg, self.task
        if cfg.zoo_path is not None:
            zoo = Zoo.load(cfg.zoo_path)
            if zoo.task != task.name or zoo.spec != task.spec:
                raise ValueError(f"--zoo {cfg.zoo_path} holds {zoo.spec.describe()} networks of task {zoo.task!r}, "
                                 f"not {task.name!r} ({task.spec.describe()})")
            source = f"loaded from `{cfg.zoo_path}`"
        else:
            path = self.out / "zoo.safetensors"
            runs = cfg.runs or task.recipe.runs
            epochs = cfg.epochs or task.recipe.epochs
            zoo = None
            if cfg.reuse and path.is_file():
                cand = Zoo.load(path)
                if (cand.num_runs == runs and int(cand.seeds.get("seed", -1)) == cfg.seed
                        and int(cand.info.get("epochs", -1)) == epochs):
                    zoo, source = cand, f"reused `{_rel(path, self.out)}`"
            if zoo is None:
                self.log(f"training the {task.name} zoo: {runs} runs × {epochs} epochs ...")
                zoo = train_population(task, runs, epochs=epochs, seed=cfg.seed)
                zoo.save(path)
                source = (f"trained by this command (`metaflow-ws zoo {task.name} --runs {runs} --epochs {epochs} "
                          f"--seed {cfg.seed}`), saved as `zoo.safetensors`")
        self.zoo = zoo
        self.final = zoo.final()
        data = task.data(zoo.data_seed)
        self.x_tr, self.y_tr = data.split("train")
        self.x_val, self.y_val = data.split("val")
        self.x_te, self.y_te = data.split("test")
        ref = self.spec.state_dict_of(zoo.params, 0)
        self.reference = ref
        self.results["zoo"] = {"source": source, "runs": zoo.num_runs, "checkpoints": len(zoo),
                               "architecture": self.spec.describe(), "params": self.spec.num_params,
                               "recipe": dict(zoo.recipe), "epochs": zoo.info.get("epochs"),
                               "test_size": int(self.x_te.shape[0]), "val_size": int(self.x_val.shape[0])}

    def _align(self, params: Params) -> Params:
        """Permutation alignment (weight matching) to the flows' reference, zoo checkpoint 0."""
        from metaflow_ws.symmetry import weight_matching

        return weight_matching(self.spec, params, self.reference, generator=torch.Generator().manual_seed(0)).params

    def _align_canonical(self, params: Params) -> Params:
        """Alignment then ReLU-scale canonicalization: the representative used for novelty distances."""
        from metaflow_ws.symmetry import canonicalize

        return canonicalize(self.spec, self._align(params))

    def _heldout(self) -> None:
        from metaflow_ws.train import train_population

        cfg = self.cfg
        runs = max(cfg.lik_networks, 2)
        z = train_population(self.task, runs, epochs=cfg.epochs or self.task.recipe.epochs, seed=cfg.seed + 1,
                             evaluate=False)
        self.heldout = z.final()

    # ------------------------------------------------------------------------------------------ flows
    def _runs(self) -> tuple[list[tuple[FlowRun, int]], list[tuple[FlowRun, int]]]:
        cfg = self.cfg
        headline = [(FlowRun(f, cfg.coupling, True), cfg.steps) for f in FLOW_NAMES]
        ablation = cfg.ablation if cfg.ablation is not None else self.task.name == "breast_cancer"
        grid = ([(FlowRun(f, c, a), cfg.grid_steps) for f in FLOW_NAMES for _, c, a in GRID_SETTINGS]
                if ablation else [])
        return headline, grid

    def _flows(self) -> None:
        headline, grid = self._runs()
        self.headline, self.grid = headline, grid
        self.flows: dict[str, Any] = {}
        self.flow_info: dict[str, dict[str, Any]] = {}
        for run, steps in dict.fromkeys(headline + grid):
            name = _folder_name(run, steps)
            flow, info = self._flow(run, steps, self.out / "flows" / name)
            self.flows[name], self.flow_info[name] = flow, info
        self.results["flows"] = self.flow_info

    def _flow(self, run: FlowRun, steps: int, folder: Path):
        from metaflow_ws.flows import FlowConfig, WeightFlow, default_prior_std, train_flow
        from metaflow_ws.flows.train import saved_flow_matches

        cfg, zoo = self.cfg, self.zoo
        fcfg = FlowConfig(flow=run.flow, widths=zoo.spec.widths, activation=zoo.spec.activation, task=zoo.task,
                          prior_std=default_prior_std(zoo), d_model=cfg.d_model,
                          num_layers=cfg.num_layers, sigma=cfg.path_noise)
        tcfg = TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, coupling=run.coupling, align=run.align,
                           seed=cfg.seed, compile=cfg.compile, precision=cfg.precision)
        info: dict[str, Any] = {"label": run.label, "flow": run.flow, "coupling": run.coupling, "aligned": run.align,
                                "steps": steps, "folder": _rel(folder, self.out)}
        if cfg.reuse and saved_flow_matches(folder, fcfg, tcfg, zoo):
            flow = WeightFlow.from_pretrained(folder, device=self.device)
            info.update(reused=True, train_seconds=flow.meta.get("seconds"), final_loss=flow.meta.get("final_loss"))
            self.log(f"  reusing {run.label}, {steps} steps ({folder})")
        else:
            self.log(f"  training {run.label}: {steps} steps ...")
            res = train_flow(zoo, fcfg, tcfg, folder, device=self.device)
            flow = res.flow
            info.update(reused=False, train_seconds=res.seconds, final_loss=res.final_loss,
                        steps_per_second=res.steps_per_second)
        info["flow_params"] = sum(p.numel() for p in flow.field.parameters())
        info["path_noise"] = flow.config.sigma
        flow.eval()
        return flow, info

    # ---------------------------------------------------------------------------------------- sampling
    def _draw(self, name: str, n: int, *, steps: int | None = None, noise: float = 0.0, guidance: float = 0.0,
              rho: float | None = None, offset: int = 100) -> Params:
        from metaflow_ws.flows import SampleConfig, sample

        cfg = self.cfg
        flow = self.flows[name]
        sc = SampleConfig(steps=steps or cfg.sample_steps, solver=cfg.solver, rho=cfg.rho if rho is None else rho,
                          noise=noise, guidance=guidance)
        gd = None
        if guidance > 0:
            k = min(cfg.guidance_points, self.x_tr.shape[0])
            gd = (self.x_tr[:k].to(self.device), self.y_tr[:k].to(self.device), self.task.kind)
        x = sample(flow, n, sc, generator=self._gen(offset), guidance_data=gd)
        return {k: v.detach().cpu().float() for k, v in flow.decode(x).items()}

    def _sample_all(self) -> None:
        self.samples: dict[str, Params] = {}
        for name in self.flows:
            t0 = time.perf_counter()
            self.samples[name] = self._draw(name, self.cfg.samples)
            self.flow_info[name]["sample_seconds"] = time.perf_counter() - t0
            Zoo.from_params(self.task.name, self.spec, self.samples[name],
                            info={"source": "flow", "flow": name}).save(self.out / "flows" / name / "samples.safetensors")

    # -------------------------------------------------------------------------------------- evaluation
    def _metrics(self, params: Params, *, novelty: bool = True, bma: bool = True) -> dict[str, Any]:
        from metaflow_ws.evaluation import bma_curve, full_metrics, functional_diversity, prediction_disagreement
        from metaflow_ws.evaluation import novelty as novelty_fn

        m = full_metrics(self.task, params, "test", data_seed=self.zoo.data_seed)
        n = self.spec.batch_size(params)
        row: dict[str, Any] = {"n": n}
        for k, v in m.items():
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std(v)
        row["accuracies"] = m["accuracy"].tolist()
        row["diversity"] = float(functional_diversity(self.spec, params, self.x_te)) if n > 1 else 0.0
        row["disagreement"] = float(prediction_disagreement(self.spec, params, self.x_te)) if n > 1 else 0.0
        if novelty:
            nov = novelty_fn(params, self.zoo, align_fn=self._align_canonical).summary()
            row["novelty_median"], row["novelty_mean"] = nov["ratio_median"], nov["ratio_mean"]
            row["near_copies"] = nov["fraction_below_0.1"]
        if bma and n > 1:
            curve = bma_curve(self.spec, params, self.x_te, self.y_te, num_orderings=self.cfg.bma_orderings,
                              generator=self._gen(700), max_k=min(self.cfg.bma_max, n))
            row["bma"] = {"k": curve.ks.tolist(), "accuracy": curve.accuracy.tolist(), "nll": curve.nll.tolist()}
            row["bma_k"], row["bma_accuracy"], row["bma_nll"] = int(curve.ks[-1]), float(curve.accuracy[-1]), \
                float(curve.nll[-1])
        return row

    def _val_accuracy(self, params: Params) -> float:
        from metaflow_ws.evaluation import batch_metrics

        if self.x_val.shape[0] == 0:
            return float("nan")
        return float(batch_metrics(self.spec, params, self.x_val, self.y_val, "classification")["accuracy"].mean())

    def _val_bma_accuracy(self, params: Params) -> float:
        """Validation accuracy of the model average of ``k = min(bma_max, n)`` networks (mean over orderings)."""
        from metaflow_ws.evaluation import bma_curve

        n = self.spec.batch_size(params)
        if self.x_val.shape[0] == 0 or n < 1:
            return float("nan")
        k = min(self.cfg.bma_max, n)
        curve = bma_curve(self.spec, params, self.x_val, self.y_val, num_orderings=self.cfg.bma_orderings,
                          generator=self._gen(701), max_k=k)
        return float(curve.accuracy[-1])

    def _evaluate(self) -> None:
        from metaflow_ws.evaluation import aligned_average_baseline, ensemble_metrics

        cfg = self.cfg
        rows: list[dict[str, Any]] = []
        zoo_row = {"method": f"Zoo networks ({self.zoo.recipe.get('optimizer', '?')}-trained, final checkpoints)",
                   "kind": "zoo", **self._metrics(self.final.params, novelty=False)}
        rows.append(zoo_row)
        ens = ensemble_metrics(self.spec, self.final.params, self.x_te, self.y_te)
        rows.append({"method": f"Deep ensemble (BMA of all {self.zoo.num_runs} final checkpoints)", "kind": "ensemble",
                     "n": self.zoo.num_runs, **{f"{k}_mean": v for k, v in ens.items()},
                     **{f"{k}_std": None for k in ens}})
        rows.append({"method": "Held-out trained networks (new seed)", "kind": "heldout",
                     **self._metrics(self.heldout.params, bma=False)})
        for run, steps in self.headline:
            name = _folder_name(run, steps)
            rows.append({"method": f"{run.label}, {steps} steps", "kind": "flow", "flow": name,
                         **self._metrics(self.samples[name])})
        # the best headline flow, chosen on the validation split: by per-sample accuracy (the headline) and, for
        # users who average samples, by the accuracy of the model average of k = min(bma_max, n) samples
        names = [_folder_name(r, s) for r, s in self.headline]
        val = {k: self._val_accuracy(self.samples[k]) for k in names}
        val_bma = {k: self._val_bma_accuracy(self.samples[k]) for k in names}
        self.best, self.best_bma = _argmax_finite(val), _argmax_finite(val_bma)
        self.results["validation_accuracy"] = val
        self.results["validation_bma_accuracy"] = val_bma
        self.results["best_flow"] = self.best
        self.results["best_bma_flow"] = self.best_bma
        baselines: list[dict[str, Any]] = []
        for run, steps in self.headline:
            name = _folder_name(run, steps)
            frow = next(r for r in rows if r.get("flow") == name)
            entry, m_div, m_acc = self._noise_entry(name, run.label, self.samples[name], frow,
                                                    bma=name == self.best)
            baselines.append(entry)
            if name == self.best and m_div is not None:
                rows.append({"method": f"Noise baseline, diversity matched to {run.label}", "kind": "noise",
                             **m_div})
                rows.append({"method": f"Noise baseline, accuracy matched to {run.label}", "kind": "noise_acc",
                             **m_acc})
        # the same comparison for networks trained anew: what an exact sampler of the trained networks' distribution
        # would score against the noise baseline
        hrow = next(r for r in rows if r["kind"] == "heldout")
        self.results["heldout_noise_baseline"] = self._noise_entry(
            "heldout", "Held-out trained networks (reference)", self.heldout.params, hrow, bma=False)[0]
        for k in cfg.average_k:
            if k <= self.zoo.num_runs:
                avg = aligned_average_baseline(self.zoo, k, cfg.samples, align_fn=self._align,
                                               generator=self._gen(502 + k))
                rows.append({"method": f"Aligned averages of {k} final checkpoints", "kind": "average",
                             **self._metrics(avg.params, bma=False)})
        self.rows = rows
        self.results["table"] = [_strip(r) for r in rows]
        self.results["noise_baselines"] = baselines
        self._output_scale()
        self.results["accuracies"] = {r["method"]: r["accuracies"] for r in rows if "accuracies" in r}
        # Table 4.1 grid
        if self.grid:
            grid = []
            for run, steps in self.grid:
                name = _folder_name(run, steps)
                m = self._metrics(self.samples[name], novelty=False, bma=False)
                grid.append({"flow": run.flow, "setting": next(lbl for lbl, c, a in GRID_SETTINGS
                                                               if c == run.coupling and a == run.align),
                             "steps": steps, "folder": name, **_strip(m)})
            self.results["table_4_1"] = grid
        # figures: BMA, histogram
        curves = {r["method"]: r["bma"] for r in rows if "bma" in r and r["kind"] in ("zoo", "flow", "noise")}
        for c in curves.values():
            c.setdefault("k", list(range(1, len(c["accuracy"]) + 1)))
        from metaflow_ws.experiments import report_plots as rp

        self._figure("bma", lambda: rp.bma_plot({("Deep ensemble (trained networks)" if k.startswith("Zoo") else k): v
                                         for k, v in curves.items()},
                                        f"{self.task.name}: Bayesian model averaging", zoo_row["accuracy_mean"]),
                     "Accuracy and NLL of the model average of k networks (mean over random orderings): flow "
                     "samples, the trained networks (deep ensemble) and the diversity-matched noise baseline.")
        hist = {r["method"]: r["accuracies"] for r in rows if r["kind"] in ("zoo", "flow")}
        self._figure("accuracy_histogram", lambda: rp.histogram_plot(hist, xlabel="test accuracy of each network",
                                                             title=f"{self.task.name}: sample accuracies vs the zoo"),
                     "Test accuracy of every sampled network next to the zoo's trained networks.")

    def _noise_entry(self, name: str, label: str, params: Params, row: dict[str, Any], *, bma: bool
                     ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
        """A population against the noise baseline tuned to its diversity and to its accuracy: the table entry and
        the two baselines' metric rows (``None`` where no noise level reaches the diversity)."""
        from metaflow_ws.evaluation import noise_baseline, noise_baseline_matched_accuracy

        entry: dict[str, Any] = {"flow": name, "label": label, "flow_accuracy": row["accuracy_mean"],
                                 "flow_diversity": row["diversity"], "flow_disagreement": row["disagreement"],
                                 "flow_novelty": row["novelty_median"]}
        nb = m_div = None
        for centers in (None, 1):  # populations less diverse than distinct runs: perturb one network
            try:
                nb = noise_baseline(self.zoo, self.x_te, params, generator=self._gen(500),
                                    num_samples=self.cfg.samples, num_centers=centers)
                break
            except ValueError as e:
                entry["matched_diversity_error"] = str(e)
        if nb is not None:
            m_div = self._metrics(nb.params, bma=bma)
            entry["matched_diversity"] = {"sigma": nb.info["sigma"], "centers": len(set(nb.info["center_runs"])),
                                          **_strip(m_div)}
        na = noise_baseline_matched_accuracy(self.zoo, self.x_te, self.y_te, row["accuracy_mean"],
                                             generator=self._gen(501), num_samples=self.cfg.samples)
        m_acc = self._metrics(na.params, bma=False)
        entry["matched_accuracy"] = {"sigma": na.info["sigma"], "converged": na.info["converged"], **_strip(m_acc)}
        return entry, m_div, m_acc

    def _output_scale(self) -> None:
        """Temperature scaling (``sample --fit-scale``): one output scale per population fitted on the
        validation split, test metrics before and after (accuracy does not change)."""
        from metaflow_ws.evaluation import fit_output_scale, full_metrics

        if self.x_val.shape[0] == 0:
            return
        rows = {r.get("flow", r["kind"]): r for r in self.rows if r["kind"] in ("zoo", "heldout", "flow")}
        pops = [("Zoo networks (final checkpoints)", "zoo", self.final.params),
                ("Held-out trained networks", "heldout", self.heldout.params)]
        pops += [(self.flow_info[k]["label"], k, self.samples[k]) for k in rows if k not in ("zoo", "heldout")]
        out = []
        for label, key, params in pops:
            scaled, c = fit_output_scale(self.spec, params, self.x_val, self.y_val)
            after = full_metrics(self.task, scaled, "test", data_seed=self.zoo.data_seed)
            o: dict[str, Any] = {"label": label, "key": key, "scale": c}
            for k in ("accuracy", "nll", "ece", "brier"):  # raw: the test metrics the samples table already has
                o[f"raw_{k}_mean"], o[f"raw_{k}_std"] = rows[key][f"{k}_mean"], rows[key][f"{k}_std"]
                o[f"fitted_{k}_mean"], o[f"fitted_{k}_std"] = _mean_std(after[k])
            out.append(o)
        self.results["output_scale"] = out

    # ------------------------------------------------------------------------------------------- sweeps
    def _quality(self, params: Params) -> dict[str, float]:
        from metaflow_ws.evaluation import batch_metrics, functional_diversity

        m = batch_metrics(self.spec, params, self.x_te, self.y_te, "classification")
        return {"accuracy": float(m["accuracy"].mean()), "nll": float(m["loss"].mean()),
                "diversity": float(functional_diversity(self.spec, params, self.x_te))}

    def _sweeps(self) -> None:
        from metaflow_ws.experiments import report_plots as rp

        cfg = self.cfg
        n = min(cfg.sweep_samples, cfg.samples)
        steps_series: dict[str, dict[str, list[float]]] = {}
        for run, steps in self.headline:
            name = _folder_name(run, steps)
            vals = [self._quality(self._draw(name, n, steps=k, offset=200)) for k in cfg.step_sweep]
            steps_series[run.label] = {m: [v[m] for v in vals] for m in ("accuracy", "nll", "diversity")}
        best = self.best
        label = self.flow_info[best]["label"]
        g_vals = [self._quality(self._draw(best, n, guidance=lam, offset=300)) for lam in cfg.guidance_sweep]
        n_vals = [self._quality(self._draw(best, n, noise=eps, offset=400)) for eps in cfg.noise_sweep]
        r_vals = [self._quality(self._draw(best, n, rho=rho, offset=600)) for rho in cfg.rho_sweep]
        zoo_row = self.rows[0]
        ref = {"accuracy": zoo_row["accuracy_mean"], "nll": zoo_row["nll_mean"], "diversity": zoo_row["diversity"]}
        # every sampler setting against the noise baseline at its own accuracy (the diversity goal's comparison)
        noise_label = "noise baseline at the same accuracy"
        g_noise, n_noise, r_noise = ({"diversity": [self._noise_diversity_at(v["accuracy"], n) for v in vals]}
                                     for vals in (g_vals, n_vals, r_vals))
        self.results["sweeps"] = {
            "samples": n, "flow": best,
            "steps": {"values": list(cfg.step_sweep), "series": steps_series},
            "guidance": {"values": list(cfg.guidance_sweep), "series": {label: _columns(g_vals)},
                         "noise_baseline": g_noise,
                         "guidance_points": min(cfg.guidance_points, int(self.x_tr.shape[0]))},
            "noise": {"values": list(cfg.noise_sweep), "series": {label: _columns(n_vals)},
                      "noise_baseline": n_noise},
            "rho": {"values": list(cfg.rho_sweep), "series": {label: _columns(r_vals)}, "noise_baseline": r_noise,
                    "steps": cfg.sample_steps},
        }
        self._figure("steps", lambda: rp.sweep_plot(list(cfg.step_sweep), steps_series, xlabel="integration steps",
                                            metrics=("accuracy", "nll"), logx=True, reference=ref,
                                            title=f"{self.task.name}: quality vs integration steps ({cfg.solver})"),
                     f"Mean test accuracy and NLL of {n} samples per point vs the number of {cfg.solver} steps.")
        self._figure("guidance", lambda: rp.sweep_plot(list(cfg.guidance_sweep),
                                               {label: _columns(g_vals), noise_label: g_noise},
                                               xlabel="guidance strength λ", metrics=("accuracy", "nll", "diversity"),
                                               logx=True, reference=ref,
                                               title=f"{self.task.name}: task-loss guidance ({label})"),
                     "Guidance by the training-loss gradient (x ← exp_x(dt·(v − λ∇L))): test accuracy, NLL and "
                     "diversity vs λ; the noise baseline's diversity at each point's accuracy beside it.")
        self._figure("noise", lambda: rp.sweep_plot(list(cfg.noise_sweep),
                                            {label: _columns(n_vals), noise_label: n_noise},
                                            xlabel="stochastic sampling noise ε",
                                            metrics=("accuracy", "nll", "diversity"), logx=True, reference=ref,
                                            title=f"{self.task.name}: stochastic sampling ({label})"),
                     "Stochastic sampling (ε·sqrt(dt) tangent noise at every step but the last): accuracy, NLL "
                     "and diversity vs ε; the noise baseline's diversity at each point's accuracy beside it.")
        self._figure("time_grid", lambda: rp.sweep_plot(list(cfg.rho_sweep),
                                                {label: _columns(r_vals), noise_label: r_noise},
                                                xlabel="time-grid exponent ρ (t_i = 1 − (1 − i/K)^ρ)",
                                                metrics=("accuracy", "nll", "diversity"), logx=False, reference=ref,
                                                title=f"{self.task.name}: time grid, {cfg.sample_steps} steps ({label})"),
                     f"The sampler's time grid t_i = 1 − (1 − i/K)^ρ at K = {cfg.sample_steps} {cfg.solver} steps "
                     "(ρ = 1 uniform; larger ρ, smaller steps near the data end t = 1): accuracy, NLL and diversity "
                     "vs ρ; the noise baseline's diversity at each point's accuracy beside it.")

    def _noise_diversity_at(self, accuracy: float, n: int) -> float:
        """Test diversity of ``n`` final checkpoints + Gaussian noise tuned to a mean test ``accuracy``; NaN when
        the noise baseline ends more than 0.01 below it (the checkpoints themselves are less accurate)."""
        from metaflow_ws.evaluation import functional_diversity, noise_baseline_matched_accuracy

        na = noise_baseline_matched_accuracy(self.zoo, self.x_te, self.y_te, accuracy, generator=self._gen(501),
                                             num_samples=n)
        if na.info["achieved"] < accuracy - 0.01:
            return float("nan")
        return float(functional_diversity(self.spec, na.params, self.x_te))

    # ------------------------------------------------------------------------------------------ barrier
    def _barriers(self) -> None:
        from metaflow_ws.experiments import report_plots as rp
        from metaflow_ws.symmetry import zoo_barrier

        runs = self.zoo.num_runs
        pairs = min(self.cfg.barrier_pairs, runs * (runs - 1) // 2)
        out, curves = {}, {}
        for label, align in (("unaligned", None), ("aligned (weight matching)", "weight")):
            r = zoo_barrier(self.zoo, pairs=pairs, align=align, generator=self._gen(800))
            out[label] = r.summary()
            curves[label] = {"mean": r.result.losses.double().mean(0).tolist(),
                             "std": r.result.losses.double().std(0, unbiased=False).tolist()}
            alphas = r.result.alphas.tolist()
        self.results["barrier"] = {"pairs": pairs, "alphas": alphas, "summary": out, "curves": curves}
        self._figure("barrier", lambda: rp.barrier_plot(alphas, curves, f"{self.task.name}: loss along linear paths "
                                                                 f"({pairs} pairs of final checkpoints)"),
                     "Test loss along θ(α) = (1−α)θa + αθb between final checkpoints of distinct runs, before and "
                     "after permutation alignment (mean ± std over pairs).")

    # --------------------------------------------------------------------------------------- likelihood
    def _likelihood(self) -> None:
        from metaflow_ws.evaluation.detection import (
            corrupt_noise,
            corrupt_row_permutation,
            detection_aurocs,
            random_init,
        )
        from metaflow_ws.experiments import report_plots as rp
        from metaflow_ws.flows.likelihood import log_likelihood

        cfg = self.cfg
        n = min(cfg.lik_networks, len(self.heldout))
        held = {k: v[:n] for k, v in self.heldout.params.items()}
        rec = self.task.recipe
        pops: dict[str, Params] = {
            "held-out trained": held,
            "zoo (training) networks": {k: v[:n] for k, v in self.final.params.items()},
            "random init": random_init(self.spec, n, scheme=rec.init, std=rec.init_std, generator=self._gen(600)),
            f"trained + noise ({CORRUPTION_NOISE:g}·RMS)": corrupt_noise(self.spec, held, CORRUPTION_NOISE,
                                                                        generator=self._gen(601)),
            "rows permuted (inconsistently)": corrupt_row_permutation(self.spec, held, generator=self._gen(602)),
        }
        aligned = {k: self._align(v) for k, v in pops.items()}
        out: dict[str, Any] = {"networks": n, "steps": cfg.lik_steps, "estimator": cfg.lik_estimator,
                               "n_probes": cfg.lik_probes if cfg.lik_estimator == "hutchinson" else 0,
                               "noise_scale": CORRUPTION_NOISE, "flows": {}}
        panels = {}
        for run, steps in self.headline:
            name = _folder_name(run, steps)
            flow = self.flows[name]
            t0 = time.perf_counter()
            use = aligned if flow.config.aligned else pops
            sizes = [self.spec.batch_size(p) for p in use.values()]
            both = {k: torch.cat([p[k] for p in use.values()]) for k in self.spec.shapes}  # one batch for all
            res = log_likelihood(flow, both, steps=cfg.lik_steps, estimator=cfg.lik_estimator,
                                 n_probes=cfg.lik_probes, generator=self._gen(603))
            dim = res.dim
            scores = dict(zip(use, (res.log_prob.double() / dim).split(sizes)))
            negatives = {k: v for k, v in scores.items() if k not in ("held-out trained", "zoo (training) networks")}
            det = detection_aurocs(scores["held-out trained"], negatives)
            det["zoo (training) networks"] = {**detection_aurocs(scores["zoo (training) networks"], {})["positive"]}
            out["flows"][name] = {"label": run.label, "dim": dim, "seconds": time.perf_counter() - t0,
                                  "nats_per_dim": det, "scores": {k: v.tolist() for k, v in scores.items()}}
            panels[run.label] = {"scores": {k: v.tolist() for k, v in scores.items()},
                                 "auroc": {k: v["auroc"] for k, v in det.items() if "auroc" in v}}
        self.results["likelihood"] = out
        self._figure("likelihood", lambda: rp.likelihood_plot(panels, f"{self.task.name}: log-likelihood under each flow"),
                     "Log-likelihood per dimension of held-out trained networks vs random-init, noisy and "
                     "row-permuted ones (AUROC of telling held-out trained networks from each).")

    # -------------------------------------------------------------------------------------------- goals
    def _goals(self) -> None:
        goals: list[dict[str, Any]] = []
        flows = {r["flow"]: r for r in self.rows if r["kind"] == "flow"}
        zoo_acc = self.rows[0]["accuracy_mean"]
        if self.task.name == "breast_cancer":
            geo = flows[_folder_name(FlowRun("geometric", self.cfg.coupling, True), self.cfg.steps)]
            zoo_nll = self.rows[0]["nll_mean"]
            goals.append({"goal": "Geometric flow mean test accuracy ≥ 0.993", "value": geo["accuracy_mean"],
                          "met": geo["accuracy_mean"] >= 0.993,
                          "detail": f"{geo['accuracy_mean']:.4f} (the zoo's trained networks: {zoo_acc:.4f})"})
            goals.append({"goal": "Geometric flow mean test NLL ≤ 0.018", "value": geo["nll_mean"],
                          "met": geo["nll_mean"] <= 0.018,
                          "detail": f"{geo['nll_mean']:.4f} (the zoo's trained networks: {zoo_nll:.4f})"})
            goals.append({"goal": "Geometric flow mean test NLL ≤ the trained networks'", "value": geo["nll_mean"],
                          "met": geo["nll_mean"] <= zoo_nll, "detail": f"{geo['nll_mean']:.4f} vs {zoo_nll:.4f}"})
            fit = {o["key"]: o for o in self.results.get("output_scale", [])}
            if geo["flow"] in fit:
                g, z = fit[geo["flow"]], fit["zoo"]
                ref = min(z["raw_nll_mean"], z["fitted_nll_mean"])
                goals.append({"goal": "Geometric flow mean test NLL ≤ the trained networks', with one output scale "
                                      "fitted on the validation split (`sample --fit-scale`; the trained networks "
                                      "raw or fitted alike, whichever is lower)",
                              "value": g["fitted_nll_mean"], "met": g["fitted_nll_mean"] <= ref,
                              "detail": f"{g['fitted_nll_mean']:.4f} (c = {g['scale']:.3g}) vs {ref:.4f} (trained: "
                                        f"raw {z['raw_nll_mean']:.4f}, fitted {z['fitted_nll_mean']:.4f}, c = "
                                        f"{z['scale']:.3g})"})
        else:
            best = flows[self.best]
            ratio = best["accuracy_mean"] / zoo_acc
            goals.append({"goal": "best flow per-sample accuracy ≥ 90 % of the trained networks' mean",
                          "value": ratio, "met": ratio >= 0.9,
                          "detail": f"{best['accuracy_mean']:.4f} / {zoo_acc:.4f}"})
            by_bma = f"validation BMA of {self.cfg.bma_max}"
            rules = ([(self.best, f"best flow by validation accuracy and by {by_bma}")] if self.best_bma == self.best
                     else [(self.best, "best flow by validation accuracy"), (self.best_bma, f"flow chosen by {by_bma}")])
            for name, rule in rules:
                row = flows[name]
                bma = max(row.get("bma", {}).get("accuracy", [float("nan")])[: self.cfg.bma_max])
                goals.append({"goal": f"BMA over ≤ {self.cfg.bma_max} samples ≥ the trained networks' mean "
                                      f"accuracy ({rule})", "flow": name,
                              "value": bma, "met": bma >= zoo_acc,
                              "detail": f"{bma:.4f} vs {zoo_acc:.4f} ({self.flow_info[name]['label']})"})
            nb = next(b for b in self.results["noise_baselines"] if b["flow"] == self.best)["matched_accuracy"]
            met = best["diversity"] > nb["diversity"] and best["novelty_median"] > nb["novelty_median"]
            ref = self.results["heldout_noise_baseline"]
            ra = ref["matched_accuracy"]
            ref_txt = (f"; networks trained anew: {ref['flow_diversity']:.4f} vs {ra['diversity']:.4f} at "
                       f"{'their' if ra['converged'] else 'the nearest reachable'} accuracy")
            goals.append({"goal": "novelty and diversity above the noise baseline at matched accuracy",
                          "value": {"flow": [best["diversity"], best["novelty_median"]],
                                    "noise": [nb["diversity"], nb["novelty_median"]]}, "met": met,
                          "detail": f"diversity {best['diversity']:.4f} vs {nb['diversity']:.4f} (disagreement "
                                    f"{best['disagreement']:.3f} vs {nb['disagreement']:.3f}), novelty "
                                    f"{best['novelty_median']:.3f} vs {nb['novelty_median']:.3f}{ref_txt}"})
        self.results["goals"] = goals

    # ------------------------------------------------------------------------------------------ markdown
    def _markdown(self, seconds: float) -> str:
        cfg, r = self.cfg, self.results
        z = r["zoo"]
        lines = [_header(cfg, self.task.name, self.command, seconds)]
        lines += [
            f"Zoo: {z['runs']} runs, {z['checkpoints']} checkpoints of {z['architecture']} ({z['params']} parameters), "
            f"{z['source']}. Test split: {z['test_size']} points (validation {z['val_size']}). Flows: Relational "
            f"Transformer d={cfg.d_model} × {cfg.num_layers} layers, batch {cfg.batch_size}, AdamW lr {cfg.lr}, "
            f"prior N(0, σ²I) with the zoo's init σ{_path_noise(self.flow_info)}; {cfg.samples} samples per flow, "
            f"{cfg.solver} with "
            f"{cfg.sample_steps} steps on the time grid ρ = {cfg.rho:g} (t_i = 1 − (1 − i/K)^ρ). Metrics on the test split, mean ± std over networks. Best flow (by "
            f"validation accuracy): **{self.flow_info[self.best]['label']}**; by validation accuracy of the model average "
            f"of {self.cfg.bma_max} samples: **{self.flow_info[self.best_bma]['label']}**.",
            "",
            "## Goals",
            "",
            "| goal | value | status |",
            "|---|---|---|",
        ]
        for g in r["goals"]:
            val = g.get("detail") or (f"{g['value']:.4f}" if isinstance(g["value"], float) else str(g["value"]))
            lines.append(f"| {g['goal']} | {val} | {'met' if g['met'] else '**not met**'} |")
        lines += ["", "## Samples and baselines", "",
                  "Diversity: mean pairwise Jensen–Shannon divergence of the predictive distributions on the test "
                  "inputs (nats, exact for categorical outputs). Novelty: distance to the nearest training "
                  "checkpoint after permutation alignment and ReLU-scale canonicalization, divided by the median "
                  "distance between final checkpoints of distinct runs (median over samples; ~0 = copy, ~1 = as "
                  f"far as another run); near-copies: fraction below 0.1. BMA: model average of k = min({cfg.bma_max}, n) "
                  "networks (mean over random orderings).", "",
                  "| method | n | accuracy | NLL | ECE | Brier | diversity | novelty | near-copies | BMA acc | BMA NLL |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            lines.append("| " + " | ".join([
                row["method"], str(row["n"]), _pm(row, "accuracy"), _pm(row, "nll"), _pm(row, "ece"),
                _pm(row, "brier"), _f(row.get("diversity")), _f(row.get("novelty_median"), 3),
                _f(row.get("near_copies"), 2), _f(row.get("bma_accuracy")), _f(row.get("bma_nll"))]) + " |")
        lines += ["", "Flows against the noise baseline (final checkpoints + Gaussian weight noise) tuned to each "
                  "flow's diversity (compare accuracy) or to its accuracy (compare diversity and novelty). "
                  "Disagreement: mean pairwise fraction of test inputs on which two networks' top classes differ "
                  "(scale-free: unlike JS it does not grow with the networks' confidence). Centres: the final "
                  "checkpoints the noise is added to; where a flow's samples are less diverse than the distinct "
                  "trained runs themselves, its diversity can only be matched by perturbing one network (1 centre). "
                  "The last row puts networks trained anew (new seed) through the same comparison: what an exact "
                  "sampler of the trained networks' distribution would score:",
                  "",
                  "| flow | flow acc / div / disagreement / novelty | noise @ matched diversity: σ, centres, acc, "
                  "novelty | noise @ matched accuracy: σ, acc, div, disagreement, novelty |", "|---|---|---|---|"]
        ref = r.get("heldout_noise_baseline")
        for b in r["noise_baselines"] + ([ref] if ref else []):
            d, a = b.get("matched_diversity"), b["matched_accuracy"]
            dcell = (f"{d['sigma']:.3g}, {d['centers']}, {d['accuracy_mean']:.4f}, {d['novelty_median']:.3g}"
                     if d is not None else "not reachable")
            lines.append(f"| {b['label']} | {b['flow_accuracy']:.4f} / {b['flow_diversity']:.4f} / "
                         f"{b['flow_disagreement']:.3f} / {b['flow_novelty']:.3g} | {dcell} | "
                         f"{a['sigma']:.3g}, {a['accuracy_mean']:.4f}{'' if a['converged'] else ' (not matched)'}, "
                         f"{a['diversity']:.4f}, {a['disagreement']:.3f}, {a['novelty_median']:.3g} |")
        if r.get("output_scale"):
            lines += ["", "## Output scale fitted on the validation split (temperature scaling)", "",
                      "Every population's last layer times the one factor c that minimizes its mean NLL on the "
                      f"{self.x_val.shape[0]} validation points (`metaflow-ws sample --fit-scale`, "
                      "`fit_output_scale`); test metrics before → after. Accuracy cannot change (c > 0 keeps every "
                      "top class). c < 1: the population was overconfident.", "",
                      "| population | c | accuracy | NLL | ECE | Brier |", "|---|---|---|---|---|---|"]
            for o in r["output_scale"]:
                lines.append(f"| {o['label']} | {o['scale']:.3g} | {o['raw_accuracy_mean']:.4f} | "
                             + " | ".join(f"{o[f'raw_{k}_mean']:.4f} → {o[f'fitted_{k}_mean']:.4f}"
                                          for k in ("nll", "ece", "brier")) + " |")
        if "table_4_1" in r:
            steps = r["table_4_1"][0]["steps"]
            lines += ["", f"## Thesis Table 4.1 protocol: flows × alignment / coupling ({steps} training steps each)",
                      "", "Test accuracy / test NLL of the samples (mean ± std over networks). Thesis (GPU-hours of "
                      "training): Euclidean aligned+OT 0.993 / 0.053, Normalized 0.993 / 0.027, Geometric aligned "
                      "0.993 / 0.018, Adam-trained 0.992 / 0.048. aligned+OT+perm (not in the thesis; "
                      "`--coupling ot-perm`, the default of `metaflow-ws train`): mini-batch OT, then each data "
                      "network permuted to match its prior draw by weight matching.", "",
                      "| flow | " + " | ".join(lbl for lbl, _, _ in GRID_SETTINGS) + " |",
                      "|---|" + "---|" * len(GRID_SETTINGS)]
            for f in FLOW_NAMES:
                cells = []
                for lbl, _, _ in GRID_SETTINGS:
                    row = next(g for g in r["table_4_1"] if g["flow"] == f and g["setting"] == lbl)
                    cells.append(f"{row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} / "
                                 f"{row['nll_mean']:.4f} ± {row['nll_std']:.4f}")
                lines.append(f"| {f.capitalize()} | " + " | ".join(cells) + " |")
        sw = r["sweeps"]
        lines += ["", f"## Sampling: steps, guidance, stochastic noise, time grid ({sw['samples']} samples per point)", "",
                  "Mean test accuracy / NLL vs integration steps:", "",
                  "| flow | " + " | ".join(str(k) for k in sw["steps"]["values"]) + " |",
                  "|---|" + "---|" * len(sw["steps"]["values"])]
        for lbl, s in sw["steps"]["series"].items():
            lines.append(f"| {lbl} | " + " | ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(s["accuracy"], s["nll"]))
                         + " |")
        for key, what in (("guidance", "guidance strength λ (training-loss gradient, "
                                       f"{sw['guidance']['guidance_points']} training points)"),
                          ("noise", "stochastic noise ε"),
                          ("rho", f"the time-grid exponent ρ ({sw['rho']['steps'] if 'rho' in sw else ''} steps, "
                                  "t_i = 1 − (1 − i/K)^ρ)")):
            if key not in sw:  # results written before the time-grid sweep existed
                continue
            blk = sw[key]
            lbl, s = next(iter(blk["series"].items()))
            lines += ["", f"{lbl}, accuracy / NLL / diversity vs {what}:", "",
                      "| " + {"rho": "ρ"}.get(key, key) + " | " + " | ".join(f"{v:g}" for v in blk["values"]) + " |",
                      "|---|" + "---|" * len(blk["values"]),
                      "| acc / NLL / div | " + " | ".join(f"{a:.3f} / {b:.3f} / {c:.3f}" for a, b, c in
                                                        zip(s["accuracy"], s["nll"], s["diversity"])) + " |"]
            if "noise_baseline" in blk:
                lines.append("| noise baseline at the same accuracy: div | "
                             + " | ".join(_f(v, 3) for v in blk["noise_baseline"]["diversity"]) + " |")
        b = r["barrier"]
        lines += ["", f"## Loss barriers ({b['pairs']} pairs of final checkpoints, test split)", "",
                  "| | midpoint barrier | max barrier | midpoint loss | endpoint loss |", "|---|---|---|---|---|"]
        for lbl, s in b["summary"].items():
            lines.append(f"| {lbl} | {s['barrier_mean']:.4f} ± {s['barrier_std']:.4f} | {s['max_barrier_mean']:.4f} ± "
                         f"{s['max_barrier_std']:.4f} | {s['midpoint_loss_mean']:.4f} ± {s['midpoint_loss_std']:.4f} | "
                         f"{s['endpoint_loss_mean']:.4f} ± {s['endpoint_loss_std']:.4f} |")
        lk = r["likelihood"]
        est = (f"Hutchinson, {lk['n_probes']} Rademacher probe(s) per step" if lk["estimator"] == "hutchinson"
               else "exact divergence")
        lines += ["", "## Likelihood: telling trained networks from random or corrupted ones", "",
                  f"Log-likelihood per dimension (nats) of {lk['networks']} networks per population under each flow "
                  f"(probability-flow ODE, {lk['steps']} reverse steps, {est}; networks aligned to the flows' "
                  "reference first; canonical flows score canonical coordinates). AUROC: held-out trained networks "
                  "(new seed) against each population (1 = always higher).", ""]
        pops = list(next(iter(lk["flows"].values()))["nats_per_dim"])
        names = ["held-out trained" if p == "positive" else p for p in pops]
        lines += ["| flow | " + " | ".join(names) + " |", "|---|" + "---|" * len(pops)]
        for f in lk["flows"].values():
            cells = []
            for p in pops:
                d = f["nats_per_dim"][p]
                cells.append(f"{d['mean']:.3f} ± {d['std']:.3f}" + (f" (AUROC {d['auroc']:.3f})" if "auroc" in d else ""))
            lines.append(f"| {f['label']} | " + " | ".join(cells) + " |")
        lines += ["", "## Wall time", "", "| stage | seconds |", "|---|---|"]
        for k, v in r["stage_seconds"].items():
            lines.append(f"| {k} | {v:.1f} |")
        lines.append(f"| **total** | {seconds:.1f} |")
        lines += ["", "Flows (folder under `flows/`; `reused` = loaded by `--reuse`, training time as recorded):", "",
                  "| flow | steps | train s | sampling s | final loss | params | reused |", "|---|---|---|---|---|---|---|"]
        for name, fi in self.flow_info.items():
            lines.append(f"| {fi['label']} (`{name}`) | {fi['steps']} | {_f(fi.get('train_seconds'), 1)} | "
                         f"{_f(fi.get('sample_seconds'), 1)} | {_f(fi.get('final_loss'))} | {fi['flow_params']} | "
                         f"{'yes' if fi['reused'] else 'no'} |")
        lines += ["", "## Figures", ""] if self.figures else []
        for name, caption in self.figures.items():
            lines += [f"![{name}](figures/{name}.png)", "", caption, ""]
        lines += ["## Reproduce", "", f"```bash\n{self.command}\n```", "",
                  f"Seeds: zoo {cfg.seed}, held-out networks {cfg.seed + 1}, flow training {cfg.seed}; sampling, "
                  "baselines and likelihood probes use fixed generators (see `results.json` → `seeds`). "
                  "`--reuse` loads the flows in `flows/` whose saved configuration matches instead of retraining "
                  "them; everything else is recomputed.", ""]
        return "\n".join(lines)


# ============================================================================================== utilities
def _columns(vals: Sequence[dict[str, float]]) -> dict[str, list[float]]:
    return {k: [v[k] for v in vals] for k in vals[0]}


def _strip(row: dict[str, Any]) -> dict[str, Any]:
    """A row without its long per-network lists (kept separately in results.json)."""
    return {k: v for k, v in row.items() if k not in ("accuracies",)}


def _pm(row: dict[str, Any], key: str) -> str:
    if f"{key}_mean" not in row:
        return "–"
    if row.get(f"{key}_std") is None:
        return f"{row[key + '_mean']:.4f}"
    return f"{row[key + '_mean']:.4f} ± {row[key + '_std']:.4f}"


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
