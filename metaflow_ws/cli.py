"""``metaflow-ws`` command line.

Each subcommand lives in its own module under :mod:`metaflow_ws.commands` and exposes ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; they are discovered automatically, and heavy imports stay
inside ``run``. User errors (unknown task, bad file, wrong architecture, NaNs, ...) print one clear line to
stderr and exit with status 2; ``--json`` output goes to stdout as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["UsageError", "main", "print_json"]


class UsageError(Exception):
    """An error caused by the user's input; the CLI prints it and exits with status 2."""


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, default=_jsonable)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _jsonable(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(o)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _commands() -> list[Any]:
    import metaflow_ws.commands as pkg

    mods = [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted((m for m in mods if hasattr(m, "NAME")), key=lambda m: getattr(m, "ORDER", 100))


def build_parser() -> argparse.ArgumentParser:
    from metaflow_ws import __version__

    parser = argparse.ArgumentParser(
        prog="metaflow-ws",
        description="Symmetry-aware flow matching over neural-network weights: zoos, flows, samples, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"metaflow-ws {__version__}")
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="CPU threads torch may use (default: torch's, one per core); use 1 when several jobs share the cores",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _commands():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv  # the exact command, for results files that record how they were made
    if args.threads is not None:
        # Several jobs that each spin one thread per core on a shared machine slow each other down many times over.
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("metaflow-ws: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors become one line and exit 2; bugs keep their traceback
        from metaflow_ws.errors import USER_ERRORS

        if isinstance(e, (UsageError, *USER_ERRORS)):
            print(f"metaflow-ws {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
