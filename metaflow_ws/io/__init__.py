"""File formats: atomic writes and the safetensors zoo format."""

from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from metaflow_ws.io.zoo import Zoo, ZooFormatError

__all__ = ["Zoo", "ZooFormatError", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
