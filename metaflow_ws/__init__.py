"""metaflow_ws: symmetry-aware flow-matching models over neural-network weights.

Heavy submodules are imported lazily; ``import metaflow_ws`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "NetworkSpec": "metaflow_ws.nets.spec",
    "MLP": "metaflow_ws.nets.spec",
    "Task": "metaflow_ws.tasks.registry",
    "get_task": "metaflow_ws.tasks.registry",
    "list_tasks": "metaflow_ws.tasks.registry",
    "register_task": "metaflow_ws.tasks.registry",
    "Zoo": "metaflow_ws.io.zoo",
    "train_population": "metaflow_ws.train.population",
    "batch_metrics": "metaflow_ws.evaluation.metrics",
    "evaluate_zoo": "metaflow_ws.evaluation.metrics",
    "align_zoo": "metaflow_ws.symmetry.align",
    "to_canonical": "metaflow_ws.symmetry.scaling",
    "from_canonical": "metaflow_ws.symmetry.scaling",
    "loss_barrier": "metaflow_ws.symmetry.barrier",
    "FlowConfig": "metaflow_ws.flows.flow",
    "WeightFlow": "metaflow_ws.flows.flow",
    "TrainConfig": "metaflow_ws.flows.train",
    "train_flow": "metaflow_ws.flows.train",
    "SampleConfig": "metaflow_ws.flows.sampling",
    "sample": "metaflow_ws.flows.sampling",
    "init_": "metaflow_ws.init",
    "warm_start": "metaflow_ws.init",
    "sample_modules": "metaflow_ws.init",
    "sample_state_dicts": "metaflow_ws.init",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaflow_ws' has no attribute {name!r}")
