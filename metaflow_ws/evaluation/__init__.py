"""Evaluation of batches of networks."""

from metaflow_ws.evaluation.metrics import batch_metrics, evaluate_zoo

__all__ = ["batch_metrics", "evaluate_zoo"]
