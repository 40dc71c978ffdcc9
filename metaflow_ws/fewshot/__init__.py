"""Few-shot learning: episode samplers, the few-shot protocol and the MAML-family baselines.

- :mod:`metaflow_ws.fewshot.episodes` — task families (sinusoid regression, N-way K-shot digits), seeded
  meta-train / meta-test streams, :class:`Episodes`.
- :mod:`metaflow_ws.fewshot.protocol` — the :class:`Method` interface and :func:`run_protocol` (propose →
  best-of-candidates → fine-tune 0/1/10 steps → query MSE or accuracy, mean ± 95 % CI).
- :mod:`metaflow_ws.fewshot.baselines` — MAML, first-order MAML, ANIL, Meta-SGD, Reptile, pretrain, scratch,
  and the method registry (:func:`register_method`).
- :mod:`metaflow_ws.fewshot.report` — what ``metaflow-ws fewshot`` writes (tables, plots).

Submodules are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Episodes": "metaflow_ws.fewshot.episodes",
    "SinusoidFamily": "metaflow_ws.fewshot.episodes",
    "DigitsFewShot": "metaflow_ws.fewshot.episodes",
    "get_family": "metaflow_ws.fewshot.episodes",
    "register_family": "metaflow_ws.fewshot.episodes",
    "stream_generator": "metaflow_ws.fewshot.episodes",
    "stream_seed": "metaflow_ws.fewshot.episodes",
    "Method": "metaflow_ws.fewshot.protocol",
    "ProtocolResult": "metaflow_ws.fewshot.protocol",
    "run_protocol": "metaflow_ws.fewshot.protocol",
    "sgd_adapt": "metaflow_ws.fewshot.protocol",
    "best_of": "metaflow_ws.fewshot.protocol",
    "save_method_state": "metaflow_ws.fewshot.protocol",
    "load_method_state": "metaflow_ws.fewshot.protocol",
    "MetaConfig": "metaflow_ws.fewshot.baselines",
    "GradientMetaLearner": "metaflow_ws.fewshot.baselines",
    "get_method": "metaflow_ws.fewshot.baselines",
    "family_method_defaults": "metaflow_ws.fewshot.baselines",
    "method_names": "metaflow_ws.fewshot.baselines",
    "method_settings": "metaflow_ws.fewshot.baselines",
    "parse_method_options": "metaflow_ws.fewshot.baselines",
    "register_method": "metaflow_ws.fewshot.baselines",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metaflow_ws.fewshot' has no attribute {name!r}")
