"""The three weight flows end to end: ``train_flow`` steps/s, the bare field step beside it, sampling time.

``bench_vector_field.py`` times the vector field alone on random inputs. This benchmark times what a user runs:
for every flow (Euclidean, Normalized, Geometric) and coupling it calls :func:`metaflow_ws.flows.train_flow` on a
``breast_cancer`` zoo (the thesis's UCI setup: MLP 30-16-16-2; built here in a few seconds, or ``--zoo PATH``)
at the thesis's field size (d = 64 × 5 layers, one head, batch 32) and reports, in one fresh subprocess per row:

- ``loop steps/s``: the training loop's steady-state rate (after ``--warmup`` steps, which include compilation):
  batch draw, coupling, path noise, field forward + backward, gradient clipping, fused AdamW, EMA update;
- ``field steps/s``: the bare field step (forward + backward + AdamW on the same flow's x_t, t) timed right after
  in the same process, so that ``loop / field`` is the share of the loop the field takes;
- ``coupling ms``: one call of the coupling on a batch (in the loop above, not extra);
- ``sample s``: :func:`metaflow_ws.flows.sample` of 100 networks × 64 Euler steps (``--sample-n``,
  ``--sample-steps``), the compiled field's first call timed apart;
- peak RSS of the process.

The issue's goal for this configuration: ≥ 10 training steps/s and 100 × 64 Euler steps in < 10 s for every
flow (the thesis's reference code: ≈ 0.1 steps/s and ≈ 10 s per Euler step on this 2-core machine). Usage:

    python benchmarks/bench_flows.py [--flows euclidean normalized geometric] [--couplings independent ot-perm]
        [--modes compiled+bf16] [--steps 100] [--warmup 30] [--zoo PATH] [--json]

``--modes`` takes any of ``eager``, ``eager+bf16``, ``compiled``, ``compiled+bf16`` (default: the fastest,
``compiled+bf16``, as ``train --compile --precision bf16``). Compilation is cached by Inductor between runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench_vector_field import run_isolated  # benchmarks/ is on sys.path when run as a script

MODES = ("eager", "eager+bf16", "compiled", "compiled+bf16")
FLOWS = ("euclidean", "normalized", "geometric")


@dataclass
class Row:
    flow: str
    coupling: str
    mode: str
    params: int
    loop_steps_per_s: float
    field_steps_per_s: float
    coupling_ms: float
    warmup_s: float
    sample_s: float
    sample_warmup_s: float
    sample_finite: bool
    peak_mem_mb: float


def _zoo(args: argparse.Namespace):
    from metaflow_ws.io.zoo import Zoo
    from metaflow_ws.train import train_population

    if args.zoo:
        return Zoo.load(args.zoo)
    return train_population("breast_cancer", seed=0)  # the task's recipe: 100 Adam runs × 50 epochs


def _field_steps_per_s(flow, x0, x1, t, n_steps: int) -> float:  # noqa: ANN001
    """Bare field step (forward + backward + fused AdamW, the loop's loss) on the flow's own path points."""
    from metaflow_ws.flows.train import flow_matching_loss

    opt = torch.optim.AdamW(flow.parameters(), lr=1e-6, fused=True)

    def step() -> None:
        loss = flow_matching_loss(flow, x0, x1, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    return n_steps / (time.perf_counter() - t0)


def flow_config(args: argparse.Namespace, kind: str, coupling: str, mode: str, out) -> None:  # noqa: ANN001
    """Runs in a subprocess: one row."""
    from metaflow_ws.flows import SampleConfig, sample
    from metaflow_ws.flows.couplings import make_coupling
    from metaflow_ws.flows.flow import FlowConfig
    from metaflow_ws.flows.train import TrainConfig, beta12, train_flow

    if args.threads:
        torch.set_num_threads(args.threads)
    zoo = _zoo(args)
    compiled, precision = mode.startswith("compiled"), "bf16" if mode.endswith("bf16") else "fp32"
    cfg = FlowConfig(flow=kind, widths=zoo.spec.widths, activation=zoo.spec.activation, task=zoo.task,
                     d_model=args.d_model, num_layers=args.layers, d_edge=args.d_edge)
    total = args.warmup + args.steps
    stamps: dict[int, float] = {}
    t_start = time.perf_counter()
    res = train_flow(zoo, cfg, TrainConfig(steps=total, batch_size=args.batch, coupling=coupling, compile=compiled,
                                           precision=precision),
                     progress=lambda step, *_: stamps.__setitem__(step, time.perf_counter()))
    loop = args.steps / (stamps[total] - stamps[args.warmup])
    flow = res.flow
    # the same flow's path points, for the bare field step and one timed coupling call
    gen = torch.Generator().manual_seed(0)
    x1_all = flow.encode(zoo.params)
    x1 = x1_all[torch.randint(len(x1_all), (args.batch,), generator=gen)]
    x0 = flow.sample_prior(args.batch, generator=gen)
    couple = make_coupling(coupling, flow.path_manifold if kind == "geometric" else None, flow.coords)
    t0 = time.perf_counter()
    for _ in range(10):
        x0c, x1c = couple(x0, x1)
    coupling_ms = (time.perf_counter() - t0) / 10 * 1e3
    t = beta12(args.batch, gen)
    flow.train()
    with flow.compiled(compiled), flow.autocast(precision):
        field = _field_steps_per_s(flow, x0c, x1c, t, args.steps)
    flow.eval()
    with flow.compiled(compiled), flow.autocast(precision):
        t0 = time.perf_counter()
        sample(flow, args.sample_n, SampleConfig(steps=1), generator=gen)  # warm-up (compilation at this batch)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = sample(flow, args.sample_n, SampleConfig(steps=args.sample_steps), generator=gen)
        sample_s = time.perf_counter() - t0
    out.put(Row(kind, coupling, mode, sum(p.numel() for p in flow.field.parameters()), loop, field, coupling_ms,
                stamps[args.warmup] - t_start, sample_s, warm, bool(torch.isfinite(x).all()),
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", nargs="+", default=list(FLOWS), choices=FLOWS)
    ap.add_argument("--couplings", nargs="+", default=["independent", "ot-perm"],
                    choices=["independent", "ot", "perm", "ot-perm"])
    ap.add_argument("--modes", nargs="+", default=["compiled+bf16"], choices=MODES)
    ap.add_argument("--zoo", default=None, help="zoo file (default: build the breast_cancer zoo, ≈ 5 s)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-edge", type=int, default=None)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=100, help="timed training steps (and bare field steps)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed training steps first (compilation)")
    ap.add_argument("--sample-n", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be ≥ 1")
    if args.zoo and not Path(args.zoo).is_file():
        ap.error(f"no zoo file at {args.zoo}")

    rows = [run_isolated(flow_config, args, kind, coupling, mode)
            for mode in args.modes for kind in args.flows for coupling in args.couplings]
    if args.json:
        print(json.dumps({"args": vars(args), "rows": [asdict(r) for r in rows]}, indent=2))
        return
    print(f"train_flow on breast_cancer (30-16-16-2), d_model={args.d_model} d_edge={args.d_edge or args.d_model} "
          f"layers={args.layers} batch={args.batch}, {args.steps} timed steps after {args.warmup}; sampling "
          f"{args.sample_n} networks x {args.sample_steps} Euler steps; threads={torch.get_num_threads()}")
    print(f"{'flow':>10} {'coupling':>11} {'mode':>13} {'params':>7} {'loop st/s':>9} {'field st/s':>10} "
          f"{'loop/field':>10} {'coupling ms':>11} {'sample s':>8} {'peak RSS MiB':>12}")
    for r in rows:
        print(f"{r.flow:>10} {r.coupling:>11} {r.mode:>13} {r.params:>7} {r.loop_steps_per_s:>9.2f} "
              f"{r.field_steps_per_s:>10.2f} {r.loop_steps_per_s / r.field_steps_per_s:>10.2f} {r.coupling_ms:>11.2f} "
              f"{r.sample_s:>8.2f} {r.peak_mem_mb:>12.0f}  (warm-up {r.warmup_s:.0f} s, sampling warm-up "
              f"{r.sample_warmup_s:.0f} s{'' if r.sample_finite else ', NON-FINITE SAMPLES'})")
    print("goal (issue 4): loop >= 10 steps/s and sampling < 10 s for every flow")


if __name__ == "__main__":
    sys.exit(main())
