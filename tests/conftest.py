"""Shared fixtures. Heavy objects are module/session scoped so the default suite stays fast on 2 cores."""

from __future__ import annotations

import numpy as np
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


def write_mnist(folder, n_train=12, n_test=5, seed=0) -> None:
    """Random MNIST-format IDX files (28×28 uint8 images, labels 0-9) in ``folder``."""
    from metaflow_ws.tasks.datasets import MNIST_FILES, write_idx

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / MNIST_FILES["train_images"], rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(folder / MNIST_FILES["train_labels"], rng.integers(0, 10, n_train, dtype=np.uint8))
    write_idx(folder / MNIST_FILES["test_images"], rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    write_idx(folder / MNIST_FILES["test_labels"], rng.integers(0, 10, n_test, dtype=np.uint8))
