"""Batched network representation: :class:`NetworkSpec`, :class:`MLP`, parameter-dict helpers and
function-preserving growth (:func:`grow`)."""

from metaflow_ws.nets.growth import can_grow, check_growth, grow
from metaflow_ws.nets.spec import ACTIVATIONS, MLP, NetworkSpec, Params, activation_fn, index_params

__all__ = ["ACTIVATIONS", "MLP", "NetworkSpec", "Params", "activation_fn", "can_grow", "check_growth", "grow",
           "index_params"]
