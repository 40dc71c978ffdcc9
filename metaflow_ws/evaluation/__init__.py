"""Evaluation of batches of networks: per-network metrics, calibration, functional diversity, Bayesian model
averaging, novelty against the training zoo, and baseline populations."""

from metaflow_ws.evaluation.baselines import (
    aligned_average_baseline,
    deep_ensemble,
    final_checkpoints,
    noise_baseline,
    noise_baseline_matched_accuracy,
)
from metaflow_ws.evaluation.calibration import (
    ReliabilityBins,
    as_params,
    brier_score,
    expected_calibration_error,
    fit_output_scale,
    full_metrics,
    network_outputs,
    predictive_probs,
    reliability_bins,
)
from metaflow_ws.evaluation.diversity import (
    entropy,
    functional_diversity,
    js_divergence,
    mean_pairwise_disagreement,
    mean_pairwise_js,
    mean_pairwise_msd,
    pairwise_js_matrix,
    prediction_disagreement,
)
from metaflow_ws.evaluation.detection import (
    auroc,
    corrupt_noise,
    corrupt_row_permutation,
    detection_aurocs,
    midranks,
    random_init,
)
from metaflow_ws.evaluation.ensemble import BMACurve, bma_curve, bma_curve_from_outputs, ensemble_metrics
from metaflow_ws.evaluation.metrics import batch_metrics, evaluate_zoo
from metaflow_ws.evaluation.novelty import AlignFn, NoveltyResult, nearest_neighbours, novelty, reference_scale

__all__ = [
    "AlignFn",
    "BMACurve",
    "NoveltyResult",
    "ReliabilityBins",
    "aligned_average_baseline",
    "auroc",
    "corrupt_noise",
    "corrupt_row_permutation",
    "detection_aurocs",
    "midranks",
    "random_init",
    "as_params",
    "batch_metrics",
    "bma_curve",
    "bma_curve_from_outputs",
    "brier_score",
    "deep_ensemble",
    "ensemble_metrics",
    "entropy",
    "evaluate_zoo",
    "expected_calibration_error",
    "fit_output_scale",
    "final_checkpoints",
    "full_metrics",
    "functional_diversity",
    "js_divergence",
    "mean_pairwise_disagreement",
    "mean_pairwise_js",
    "mean_pairwise_msd",
    "nearest_neighbours",
    "network_outputs",
    "noise_baseline",
    "noise_baseline_matched_accuracy",
    "novelty",
    "pairwise_js_matrix",
    "prediction_disagreement",
    "predictive_probs",
    "reference_scale",
    "reliability_bins",
]
