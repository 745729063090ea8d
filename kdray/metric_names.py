"""The metrics' names and preferred directions, free of torch: ``kdray report`` needs them and
starts ~1.5 s faster without importing torch."""
from __future__ import annotations

TRANSFER_METRICS: tuple[str, ...] = ("activation_distance", "rank_disagreement", "prediction_disagreement",
                                     "js_divergence")

METRIC_DIRECTIONS: dict[str, str] = {
    "activation_distance": "lower",
    "js_divergence": "lower",
    "rank_disagreement": "lower",
    "prediction_disagreement": "lower",
    "prediction_agreement": "higher",
    "correct_agreement": "higher",
    "incorrect_agreement": "higher",
    "variation_of_information": "lower",
    "procrustes_distance": "lower",
    "test_acc": "higher",
    "test_loss": "lower",
    "train_acc": "higher",
    "train_loss": "lower",
}
