"""Relational Transformer vector field: training steps/s, peak memory and sampling time.

Every configuration runs in a fresh subprocess (so ``ru_maxrss`` is that configuration's own peak) and
measures fwd + bwd + AdamW steps/s on random canonical-layout inputs (``D + 1`` coordinates, as for the
normalized/geometric flows). The sampling row times 100 networks × 64 Euler steps of a geometric flow
(product-manifold velocity and exponential map, forward-only). Usage:

    python benchmarks/bench_vector_field.py [--batch 32] [--d-model 64] [--layers 5] [--heads 1]
        [--d-edge D] [--backend blocks|scatter] [--steps 10] [--compile] [--bf16] [--tune-malloc] [--quick] [--sampling-only] [--json]

``--bf16`` adds a row with the field under bfloat16 autocast (``metaflow-ws train --precision bf16``) next to
every mode. ``--compile`` adds, next to every eager row, the same step with the field under ``torch.compile`` (as
``metaflow-ws train --compile``: no activation checkpointing), its one-off compile time and its speed-up.

On CPU the model is memory-bound and glibc hands every large tensor fresh (page-faulting) pages;
``--tune-malloc`` keeps freed memory in the heap (``mallopt`` in the benchmark processes only), which
speeds the large graphs up markedly at the price of a higher peak RSS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

from metaflow_ws.geometry import product_manifold_for
from metaflow_ws.graph import neural_graph
from metaflow_ws.models import AUTO_CHECKPOINT_ELEMENTS, RelationalTransformer
from metaflow_ws.nets import NetworkSpec

THESIS_PARAMS = 437_000  # thesis flow at d = 64


@dataclass
class Row:
    widths: str
    nodes: int
    edges: int
    params: int
    checkpoint: str
    compiled: bool
    precision: str
    compile_s: float
    steps_per_s: float
    ms_per_step: float
    peak_mem_mb: float
    mem_over_baseline_mb: float


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _setup(args: argparse.Namespace) -> None:
    """Per-subprocess settings: thread count and (optionally) glibc heap retention."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_malloc and sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve tensors from the heap, not fresh mmaps
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep freed heap memory for reuse


def _build(spec: NetworkSpec, args: argparse.Namespace, checkpoint: bool | str, device: torch.device) -> RelationalTransformer:
    torch.manual_seed(0)
    return RelationalTransformer(
        spec,
        d_model=args.d_model,
        num_layers=args.layers,
        heads=args.heads,
        n_globals=1,
        d_edge=args.d_edge,
        backend=args.backend,
        checkpoint=checkpoint,
    ).to(device)


def train_config(widths: tuple[int, ...], args: argparse.Namespace, checkpoint: bool | str, compiled: bool,
                 precision: str, out: mp.Queue) -> None:
    """Runs in a subprocess: steps/s of fwd + bwd + AdamW at ``args.batch``; peak memory. ``precision="bf16"``
    runs the field under bfloat16 autocast as ``WeightFlow.autocast`` does (float32 weights, loss and step)."""
    _setup(args)
    device = torch.device(args.device)
    spec = NetworkSpec(widths)
    g = neural_graph(spec)
    model = _build(spec, args, False if compiled else checkpoint, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))  # as train_flow
    forward = torch.compile(model, dynamic=False) if compiled else model
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(args.batch, spec.num_params + 1, generator=gen).to(device)
    x0 = torch.randn(args.batch, spec.num_params + 1, generator=gen).to(device)

    def step() -> None:
        t = torch.rand(args.batch, device=device)
        xt = x0 + t[:, None] * (x1 - x0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = forward(xt, t)
        loss = (pred.float() - x1).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    baseline = _rss_mb()  # model, optimizer and data built, no step taken yet
    n_steps = max(2, args.steps // 3) if g.num_edges > 5000 else args.steps
    t0 = time.perf_counter()
    step()  # warm-up (allocator, lazy imports; compilation)
    compile_s = time.perf_counter() - t0 if compiled else 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n_steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        over = peak
    else:
        peak = _rss_mb()
        over = peak - baseline
    recomputed = not compiled and (checkpoint is True or (checkpoint == "auto" and args.batch * g.num_edges
                                                          * model.d_edge >= AUTO_CHECKPOINT_ELEMENTS))
    out.put(Row("-".join(map(str, widths)), g.num_nodes, g.num_edges, sum(p.numel() for p in model.parameters()),
                f"{checkpoint}→{'on' if recomputed else 'off'}" if checkpoint == "auto" else str(checkpoint),
                compiled, precision, compile_s, 1 / dt, dt * 1e3, peak, over))


def sampling_config(args: argparse.Namespace, compiled: bool, precision: str, out: mp.Queue) -> None:
    """Runs in a subprocess: 100 networks × 64 Euler steps of a geometric flow on 30-16-16-2 (forward only),
    optionally with the field compiled and/or under bfloat16 autocast (``metaflow-ws sample --compile
    --precision bf16``); the warm-up call (compilation) is timed separately."""
    _setup(args)
    device = torch.device(args.device)
    spec = NetworkSpec((30, 16, 16, 2))
    model = _build(spec, args, False, device).eval()
    forward = torch.compile(model, dynamic=False) if compiled else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    man = product_manifold_for(spec)
    n, steps = args.sample_n, args.sample_steps
    x = man.random_projected_normal((n, man.dim), 0.3, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode(), amp:
        # an inference tensor, as every later x: a normal tensor has another dispatch key set, which fails the
        # compiled graph's guard and recompiles it inside the timed loop (≈ 2 s)
        x = x.clone()
        t0 = time.perf_counter()
        forward(x, torch.zeros(n, device=device))  # warm-up (compilation)
        warmup = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            t = torch.full((n,), i / steps, device=device)
            x1_hat = man.project(forward(x, t).float())
            x = man.exp(x, man.velocity(x, x1_hat, t) / steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.put({"networks": n, "euler_steps": steps, "seconds": time.perf_counter() - t0, "compiled": compiled,
                 "precision": precision, "warmup_s": warmup, "finite": bool(torch.isfinite(x).all())})


def _mode(compiled: bool, precision: str) -> str:
    return ("compiled" if compiled else "eager") + ("+bf16" if precision == "bf16" else "")


def run_isolated(target, *a):  # noqa: ANN001 - also used by profile_train_step.py
    """``target(*a, queue)`` in a fresh spawned process (its own peak memory and compile state); returns what
    it puts on the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*a, q))
    p.start()
    while True:  # a child that dies (an exception, the OOM killer) puts nothing: stop instead of waiting forever
        try:
            res = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not p.is_alive() and q.empty():
                p.join()
                raise RuntimeError(f"benchmark process for {getattr(target, '__name__', target)}{a[1:]} exited with "
                                   f"code {p.exitcode} before reporting (its traceback is above)") from None
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-edge", type=int, default=None)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--backend", default="blocks", choices=["blocks", "scatter"])
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per configuration (784: a third)")
    ap.add_argument("--sample-n", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tune-malloc", action="store_true", help="glibc: keep freed memory in the heap (see doc)")
    ap.add_argument("--compile", action="store_true", help="also time every graph with torch.compile (see doc)")
    ap.add_argument("--bf16", action="store_true",
                    help="also time every mode with the field under bfloat16 autocast (as train --precision bf16)")
    ap.add_argument("--graphs", nargs="+", default=None, metavar="W-W-...",
                    help="graphs to time instead of the default set, e.g. 30-16-16-2 40-100-100-10")
    ap.add_argument("--quick", action="store_true", help="skip the 784-10-10 runs and the sampling row")
    ap.add_argument("--sampling-only", action="store_true", help="time only the sampling rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    configs: list[tuple[tuple[int, ...], bool | str]] = [((30, 16, 16, 2), "auto"), ((64, 10, 10), "auto")]
    if not args.quick:
        configs += [((40, 100, 100, 10), "auto"), ((784, 10, 10), "auto"), ((784, 10, 10), False)]
    if args.graphs:
        configs = [(tuple(int(w) for w in g.split("-")), "auto") for g in args.graphs]
    rows = []
    if args.sampling_only:
        configs, args.quick = [], False
    precisions = ["fp32", "bf16"] if args.bf16 else ["fp32"]
    for w, ck in configs:
        for compiled in [False, True] if args.compile and ck == "auto" else [False]:
            for prec in precisions:
                rows.append(run_isolated(train_config, w, args, ck, compiled, prec))
    sampling = [] if args.quick else [
        run_isolated(sampling_config, args, compiled, prec)
        for compiled in ([False, True] if args.compile else [False]) for prec in precisions]

    if args.json:
        print(json.dumps({"args": vars(args), "train": [asdict(r) for r in rows], "sampling": sampling}, indent=2))
        return
    mem = "peak MiB (CUDA)" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"Relational Transformer d_model={args.d_model} d_edge={args.d_edge or args.d_model} layers={args.layers} "
          f"heads={args.heads} backend={args.backend} batch={args.batch} device={args.device} "
          f"threads={torch.get_num_threads() if not args.threads else args.threads} tune_malloc={args.tune_malloc}")
    print(f"{'graph':>14} {'nodes':>6} {'edges':>6} {'params':>8} {'checkpoint':>10} {'mode':>13} {'steps/s':>8} "
          f"{'ms/step':>8} {'vs eager':>8} {mem:>16} {'over base':>10}")
    eager = {r.widths: r.steps_per_s for r in rows
             if not r.compiled and r.precision == "fp32" and r.checkpoint.startswith("auto")}
    for r in rows:
        fast = r.compiled or r.precision != "fp32"
        ratio = f"{r.steps_per_s / eager[r.widths]:.2f}x" if fast and r.widths in eager else ""
        print(f"{r.widths:>14} {r.nodes:>6} {r.edges:>6} {r.params:>8} {r.checkpoint:>10} "
              f"{_mode(r.compiled, r.precision):>13} {r.steps_per_s:>8.2f} {r.ms_per_step:>8.1f} {ratio:>8} "
              f"{r.peak_mem_mb:>16.0f} {r.mem_over_baseline_mb:>10.0f}" + (f"  (compile {r.compile_s:.0f} s)" if r.compiled else ""))
    print(f"(thesis flow at d=64: ~{THESIS_PARAMS // 1000}K parameters)")
    for smp in sampling:
        print(f"sampling ({_mode(smp['compiled'], smp['precision'])}): {smp['networks']} networks x {smp['euler_steps']} geometric Euler steps on "
              f"30-16-16-2: {smp['seconds']:.2f} s (warm-up {smp['warmup_s']:.1f} s; finite: {smp['finite']})")


if __name__ == "__main__":
    sys.exit(main())
