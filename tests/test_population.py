import dataclasses

import pytest
import torch

from metaflow_ws.tasks import get_task
from metaflow_ws.train import kept_steps, train_population
from metaflow_ws.train.reference import train_with_torch_optim


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_vmapped_training_equals_torch_optim(optimizer):
    task = get_task("breast_cancer")
    rec = dataclasses.replace(task.recipe, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3,
                              momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)
    task = dataclasses.replace(task, recipe=rec)
    zoo = train_population(task, 3, epochs=3, seed=5, dtype=torch.float64)
    final = zoo.final()
    ref = train_with_torch_optim(task, 3, epochs=3, seed=5, dtype=torch.float64)
    for r in range(3):
        for k, v in ref[r].items():
            torch.testing.assert_close(final.params[k][r], v, rtol=1e-9, atol=1e-10)
    # distinct runs really differ (own init and data order)
    assert not torch.allclose(final.params["layers.0.weight"][0], final.params["layers.0.weight"][1])


def test_checkpoints_follow_recipe():
    # breast_cancer: 398 train points, batch 80 -> 5 steps/epoch; 50 epochs, skip 10, every 4th -> 50 per run
    steps = kept_steps(250, 5, 10, 4)
    assert len(steps) == 50 and steps[-1] == 250 and steps[0] > 50
    zoo = train_population("breast_cancer", 2, epochs=12, seed=0)
    assert len(zoo) == 2 * len(kept_steps(60, 5, 10, 4))
    assert zoo.final().step.tolist() == [60, 60]
    assert {"train_loss", "train_accuracy", "test_loss", "test_accuracy", "val_accuracy"} <= set(zoo.metrics)


def test_population_learns(tiny_bc_zoo):
    s = tiny_bc_zoo.summary()
    assert s["test_accuracy_mean"] > 0.85
    assert s["runs"] == 6


def test_regression_and_synthetic_families():
    z = train_population("sinusoid", 2, epochs=3, seed=0)
    assert "test_mse" in z.metrics and "test_accuracy" not in z.metrics
    toy = train_population("gaussian_toy", 2000, seed=0)
    flat = toy.flat()
    assert flat.shape == (2000, 802)
    assert abs(float(flat.mean()) - 1.0) < 0.01 and abs(float(flat.std()) - 1.0) < 0.01


def test_divergence_is_a_clear_error():
    task = get_task("breast_cancer")
    task = dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, optimizer="sgd", lr=1e6))
    with pytest.raises(FloatingPointError, match="diverged"):
        train_population(task, 2, epochs=3)
