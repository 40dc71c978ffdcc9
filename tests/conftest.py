"""Shared fixtures. Heavy objects are module/session scoped so the default suite stays fast on 2 cores."""

from __future__ import annotations

import pytest
import torch

from metaflow_ws.nets import NetworkSpec


@pytest.fixture(scope="session")
def small_spec() -> NetworkSpec:
    return NetworkSpec((5, 4, 3, 2), "relu")


@pytest.fixture(scope="session")
def tiny_bc_zoo():
    """A small trained breast_cancer zoo: 6 runs × 4 epochs (≈ 1 s)."""
    from metaflow_ws.train import train_population

    return train_population("breast_cancer", 6, epochs=4, seed=0)


def random_params(spec: NetworkSpec, batch: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return spec.init(batch, scheme="normal", std=0.5, generator=g, dtype=dtype)
