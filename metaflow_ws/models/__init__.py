"""Vector-field models over neural graphs."""

from metaflow_ws.models.relational_transformer import Backend, RelationalTransformer, RTLayer, sinusoidal_embedding

__all__ = ["Backend", "RTLayer", "RelationalTransformer", "sinusoidal_embedding"]
