"""Where the time of one compiled vector-field training step goes: FLOPs, matmuls, fused kernels, wrapper.

Builds the benchmark's field (Relational Transformer, ``--d-model 64 --layers 5``, batch 32, canonical
``D + 1`` inputs, fused AdamW; as ``bench_vector_field.py``) on one graph, counts the FLOPs of a forward +
backward pass (``torch.utils.flop_counter``), then times the compiled step (``torch.compile``, bfloat16 autocast
unless ``--fp32``) and splits one profiled run of it into

- ``matmul``: the extern ``aten`` matrix products (``mm``, ``bmm``, ``addmm``, ``baddbmm``);
- ``fused kernels``: inductor's generated C++ kernels (elementwise, norms, reductions);
- ``wrapper``: the Python code inductor generates to call them (self time of ``Call CompiledFxGraph``);
- ``other``: the optimizer, copies and the rest.

The profiled step runs in a fresh subprocess. ``--cpp-wrapper`` also times (in another subprocess, not
split: its matmuls are called from C++ and do not show as ``aten`` ops) the same step compiled with inductor's
C++ wrapper, ``cpp_wrapper=True``, the usual cure for wrapper time, and prints the ratio of the two. Usage:

    python benchmarks/profile_train_step.py [--graph 30-16-16-2] [--d-model 64] [--d-edge D] [--layers 5]
        [--batch 32] [--steps 30] [--fp32] [--cpp-wrapper] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from bench_vector_field import run_isolated  # benchmarks/ is on sys.path when run as a script
from metaflow_ws.models import RelationalTransformer
from metaflow_ws.nets import NetworkSpec

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def _model(args: argparse.Namespace) -> RelationalTransformer:
    torch.manual_seed(0)
    spec = NetworkSpec(tuple(int(w) for w in args.graph.split("-")))
    return RelationalTransformer(spec, d_model=args.d_model, num_layers=args.layers, n_globals=1,
                                 d_edge=args.d_edge, checkpoint=False)


def flops(args: argparse.Namespace) -> tuple[int, float]:
    """Parameters and GFLOP of one forward + backward pass at ``args.batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(args)
    x, y = torch.randn(args.batch, model.dim), torch.randn(args.batch, model.dim)
    with FlopCounterMode(display=False) as counter:
        (model(x, torch.rand(args.batch)) - y).pow(2).mean().backward()
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() / 1e9


def profile_mode(args: argparse.Namespace, cpp_wrapper: bool, out: mp.Queue) -> None:
    """Runs in a subprocess: compile time, steps/s and (Python wrapper only) the per-category split of one
    profiled run."""
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    inductor_config.cpp.enable_kernel_profile = True  # name every generated kernel in the profile
    model = _model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model, dynamic=False, options={"cpp_wrapper": cpp_wrapper})
    x, y = torch.randn(args.batch, model.dim), torch.randn(args.batch, model.dim)
    bf16 = not args.fp32

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = forward(x, torch.rand(args.batch))
        loss = (pred.float() - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    compile_s = time.perf_counter() - t0
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    if cpp_wrapper:
        out.put({"compile_s": compile_s, "ms_per_step": ms, "steps_per_s": 1e3 / ms})
        return
    n_prof = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n_prof):
            step()
    split = {"matmul": 0.0, "fused kernels": 0.0, "wrapper": 0.0, "other": 0.0}
    for ev in prof.key_averages():
        self_ms = ev.self_cpu_time_total / 1e3 / n_prof
        if ev.key in MATMULS:
            split["matmul"] += self_ms
        elif "cpp_fused" in ev.key:
            split["fused kernels"] += self_ms
        elif ev.key.startswith("## Call CompiledFxGraph"):
            split["wrapper"] += self_ms
        else:
            split["other"] += self_ms
    out.put({"compile_s": compile_s, "ms_per_step": ms, "steps_per_s": 1e3 / ms,
             "profiled_ms": split})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", default="30-16-16-2", help="widths of the target network (default: breast_cancer)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--d-edge", type=int, default=None)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--fp32", action="store_true", help="float32 field (default: bfloat16 autocast, as --precision bf16)")
    ap.add_argument("--cpp-wrapper", action="store_true", help="also time the step with inductor's C++ wrapper")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    params, gflop = flops(args)
    row = run_isolated(profile_mode, args, False)
    if args.cpp_wrapper:
        row["cpp_wrapper"] = run_isolated(profile_mode, args, True)
    if args.json:
        print(json.dumps({"graph": args.graph, "params": params, "gflop_per_step": gflop, **row}, indent=2))
        return
    prec = "fp32" if args.fp32 else "bf16"
    print(f"{args.graph}, d_model {args.d_model}, d_edge {args.d_edge or args.d_model}, {args.layers} layers, "
          f"batch {args.batch}, {params} params, {prec}: {gflop:.2f} GFLOP per forward + backward")
    s = row["profiled_ms"]
    print(f"compiled: {row['compile_s']:.1f} s to compile, {row['steps_per_s']:.2f} steps/s "
          f"({row['ms_per_step']:.1f} ms per step)")
    print(f"one profiled step, ms: matmul {s['matmul']:.1f}, fused kernels {s['fused kernels']:.1f}, "
          f"wrapper {s['wrapper']:.1f}, other {s['other']:.1f}")
    print(f"matmul throughput: {gflop / (s['matmul'] / 1e3):.0f} GFLOP/s if every FLOP is in them")
    if args.cpp_wrapper:
        c = row["cpp_wrapper"]
        print(f"compiled with cpp_wrapper: {c['compile_s']:.1f} s to compile, {c['steps_per_s']:.2f} steps/s "
              f"({c['steps_per_s'] / row['steps_per_s']:.2f}x the Python wrapper)")


if __name__ == "__main__":
    main()
