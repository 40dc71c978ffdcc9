"""``metaflow-ws tasks``: list the registered task families."""

from __future__ import annotations

import argparse

NAME = "tasks"
HELP = "list registered tasks with architecture and dataset sizes"
ORDER = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from metaflow_ws.cli import print_json
    from metaflow_ws.flows import task_flow_defaults
    from metaflow_ws.tasks import list_tasks

    rows = [t.summary() | {"flow": task_flow_defaults(t.name)} for t in list_tasks()]
    if args.json:
        print_json({"tasks": rows})
        return 0
    print(f"{'task':<16} {'kind':<15} {'architecture':<28} {'params':>7} {'train/val/test':>16}  "
          f"{'recipe':<30} flow (train defaults)")
    for r in rows:
        sizes = "/".join(str(v) for v in r["sizes"].values()) if r["sizes"] else "(no data)"
        recipe = f"{r['optimizer']}, {r['runs']} runs × {r['epochs']} epochs"
        f = r["flow"]
        print(f"{r['name']:<16} {r['kind']:<15} {r['architecture']:<28} {r['params']:>7} {sizes:>16}  "
              f"{recipe:<30} d={f['d_model']} × {f['num_layers']}, lr {f['lr']:g}")
    missing = [r for r in rows if r.get("unavailable")]
    for r in missing:
        print(f"  note: {r['name']}: {r['unavailable']} (pass --data-dir or set METAFLOW_WS_DATA)")
    return 0
