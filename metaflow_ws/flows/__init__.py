"""Weight-space flow matching: Euclidean, Normalized and Geometric flows."""

from metaflow_ws.flows.coordinates import FLOWS, WeightCoordinates
from metaflow_ws.flows.couplings import IndependentCoupling, OTCoupling, PermutationCoupling, make_coupling
from metaflow_ws.flows.flow import PRECISIONS, FlowConfig, FlowFormatError, WeightFlow, default_prior_std
from metaflow_ws.flows.likelihood import LikelihoodResult, log_likelihood
from metaflow_ws.flows.sampling import SOLVERS, SampleConfig, guidance_gradient, sample, time_grid
from metaflow_ws.flows.train import (
    TrainConfig,
    TrainResult,
    beta12,
    flow_matching_loss,
    task_flow_defaults,
    train_flow,
)

__all__ = [
    "FLOWS",
    "PRECISIONS",
    "SOLVERS",
    "FlowConfig",
    "FlowFormatError",
    "IndependentCoupling",
    "LikelihoodResult",
    "OTCoupling",
    "PermutationCoupling",
    "SampleConfig",
    "TrainConfig",
    "TrainResult",
    "WeightCoordinates",
    "WeightFlow",
    "beta12",
    "default_prior_std",
    "flow_matching_loss",
    "guidance_gradient",
    "log_likelihood",
    "make_coupling",
    "sample",
    "task_flow_defaults",
    "time_grid",
    "train_flow",
]
