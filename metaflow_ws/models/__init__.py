"""Vector-field models over neural graphs."""

from metaflow_ws.models.relational_transformer import (
    AUTO_CHECKPOINT_ELEMENTS,
    Backend,
    RelationalTransformer,
    RTLayer,
    sinusoidal_embedding,
)

__all__ = ["AUTO_CHECKPOINT_ELEMENTS", "Backend", "RTLayer", "RelationalTransformer", "sinusoidal_embedding"]
