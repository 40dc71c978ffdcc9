import dataclasses

import pytest
import torch

from metaflow_ws.nets import MLP
from metaflow_ws.tasks import get_task
from metaflow_ws.train import init_runs, kept_steps, run_generators, train_population


def _reference_torch_optim(task, runs, epochs, seed, dtype=torch.float64):
    """Each network alone: an nn.Module, torch.optim, the same per-run init and data order."""
    rec = task.recipe
    data = task.data(0)
    x, y = data.x_train.to(dtype), data.y_train
    n, bs = x.shape[0], min(rec.batch_size, x.shape[0])
    init_gens, order_gens = run_generators(seed, runs)
    init = init_runs(task, init_gens, dtype)
    finals = []
    for r in range(runs):
        m = MLP(task.spec.widths, task.spec.activation).to(dtype)
        m.load_state_dict({k: v[r] for k, v in init.items()})
        if rec.optimizer == "adam":
            opt = torch.optim.Adam(m.parameters(), lr=rec.lr, betas=rec.betas, eps=rec.eps, weight_decay=rec.weight_decay)
        else:
            opt = torch.optim.SGD(m.parameters(), lr=rec.lr, momentum=rec.momentum, weight_decay=rec.weight_decay)
        for _ in range(epochs):
            order = torch.randperm(n, generator=order_gens[r])
            for s in range(0, n, bs):
                idx = order[s : s + bs]
                opt.zero_grad()
                torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
                opt.step()
        finals.append({k: v.detach() for k, v in m.state_dict().items()})
    return finals


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_vmapped_training_equals_torch_optim(optimizer):
    task = get_task("breast_cancer")
    rec = dataclasses.replace(task.recipe, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3,
                              momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)
    task = dataclasses.replace(task, recipe=rec)
    zoo = train_population(task, 3, epochs=3, seed=5, dtype=torch.float64)
    final = zoo.final()
    ref = _reference_torch_optim(task, 3, 3, seed=5)
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
