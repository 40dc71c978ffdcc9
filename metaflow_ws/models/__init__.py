"""Vector-field models over neural graphs."""

from metaflow_ws.models.relational_transformer import (
    AUTO_CHECKPOINT_ELEMENTS,
    Backend,
    RelationalTransformer,
    RTLayer,
    sinusoidal_embedding,
)
from metaflow_ws.models.set_encoder import SetEncoder, SetEncoderConfig

__all__ = [
    "AUTO_CHECKPOINT_ELEMENTS",
    "Backend",
    "RTLayer",
    "RelationalTransformer",
    "SetEncoder",
    "SetEncoderConfig",
    "sinusoidal_embedding",
]
