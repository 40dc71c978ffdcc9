"""Batched network representation: :class:`NetworkSpec`, :class:`MLP` and parameter-dict helpers."""

from metaflow_ws.nets.spec import ACTIVATIONS, MLP, NetworkSpec, Params, activation_fn, index_params

__all__ = ["ACTIVATIONS", "MLP", "NetworkSpec", "Params", "activation_fn", "index_params"]
