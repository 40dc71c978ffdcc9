"""CLI subcommands, one module each (discovered by :mod:`metaflow_ws.cli`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["add_common", "add_flow_size_options", "flow_size", "parse_widths", "progress_bar"]


def add_common(p: argparse.ArgumentParser, *, json_flag: bool = True, device: bool = True, seed: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if device:
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed")


def add_flow_size_options(p: argparse.ArgumentParser, what: str = "the flow", *, quick: bool = False) -> None:
    """``--d-model``, ``--layers`` and ``--lr``; unset, they take the task's ``[flow]`` table (:func:`flow_size`)."""
    from metaflow_ws.flows import FlowConfig, TrainConfig
    from metaflow_ws.flows.train import check_lr

    def learning_rate(text: str) -> float:
        try:
            check_lr(lr := float(text))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return lr

    p.add_argument("--d-model", type=int, default=None,
                   help=f"width of {what}'s Relational Transformer (default: the task's [flow] d_model, else "
                        f"{FlowConfig.d_model}{'; --quick: 16' if quick else ''})")
    p.add_argument("--layers", type=int, default=None,
                   help=f"its number of layers (default: the task's [flow] num_layers, else {FlowConfig.num_layers}"
                        f"{'; --quick: 2' if quick else ''})")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help=f"peak AdamW learning rate of {what} (default: the task's [flow] lr, else {TrainConfig.lr:g})")


def flow_size(args: argparse.Namespace, task: str | None) -> dict[str, int | float]:
    """``{"d_model", "num_layers", "lr"}`` from :func:`add_flow_size_options`' flags, the task's ``[flow]`` table
    (:func:`metaflow_ws.flows.task_flow_defaults`) where a flag is not given."""
    from metaflow_ws.flows import task_flow_defaults

    given = {"d_model": args.d_model, "num_layers": args.layers, "lr": args.lr}
    return task_flow_defaults(task) | {k: v for k, v in given.items() if v is not None}


def parse_widths(text: str) -> tuple[int, ...]:
    """``"30-16-16-16-2"`` → ``(30, 16, 16, 16, 2)`` (an argparse ``type``: bad text is a usage error)."""
    try:
        widths = tuple(int(w) for w in text.split("-"))
    except ValueError:
        widths = ()
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected layer widths like 30-16-16-2 (inputs-hidden...-outputs); "
                                         f"got {text!r}")
    return widths


def add_speed_options(p: argparse.ArgumentParser, what: str = "train the vector field") -> None:
    """``--compile`` and ``--precision``: how the flow's vector field runs (not what it computes)."""
    p.add_argument("--compile", action="store_true",
                   help=f"{what} through torch.compile: ≈ 1 min to compile (cached across runs), then 1.3-2.4× faster "
                        "steps on CPU (needs a C++ compiler); worth it for long runs and large graphs")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help=f"bf16: {what} in mixed precision (≈ 1.4× faster compiled steps on CPUs with AMX / "
                        "AVX512-BF16 and on GPUs; emulated and slower elsewhere)")


def progress_bar(total: int, desc: str, *, fmt: Callable[[float], str] | None = None):
    """A tqdm bar on stderr and a callback ``(step, total, value)`` that advances it."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False, mininterval=0.5)

    def update(step: int, _total: int, value: float) -> None:
        bar.n = step
        if step == _total or step % 10 == 0:
            bar.set_postfix_str(fmt(value) if fmt else f"loss={value:.4f}", refresh=False)
            bar.refresh()

    return bar, update
