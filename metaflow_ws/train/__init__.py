"""Population training with torch.func and functional optimizers."""

from metaflow_ws.train.losses import loss_fn, prediction_loss
from metaflow_ws.train.optim import SGD, Adam, make_optimizer
from metaflow_ws.train.population import init_runs, kept_steps, run_generators, run_seed, train_population

__all__ = ["SGD", "Adam", "init_runs", "kept_steps", "loss_fn", "make_optimizer", "prediction_loss",
           "run_generators", "run_seed", "train_population"]
