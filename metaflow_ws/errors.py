"""Exception types shown to CLI users as a one-line message (exit status 2) instead of a traceback."""

from __future__ import annotations

__all__ = ["USER_ERRORS", "resolve_device"]

from metaflow_ws.io.zoo import ZooFormatError
from metaflow_ws.tasks.registry import TaskFileError, UnknownTaskError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FloatingPointError,
    UnknownTaskError,
    TaskFileError,
    ZooFormatError,
)


def resolve_device(name: str | None = "auto"):  # -> torch.device
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    return dev
