"""compute_metrics and confusion_matrices checked against scikit-learn/numpy and hand-computed examples."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score)

from csi_dist.core.domain import NUM_CLASSES, UNKNOWN_CLASS, ZONE_NAMES
from csi_dist.evaluation.metrics import ahf_classes, compute_metrics, confusion_matrices, csi_average

GRADE_LABELS = [0, 1, 2, 3]


def probs_for(predictions: np.ndarray) -> np.ndarray:
    """Probabilities whose argmax is `predictions` (N, 6)."""
    probs = np.full((*predictions.shape, NUM_CLASSES), 0.02)
    np.put_along_axis(probs, predictions[..., None], 0.92, axis=-1)
    return probs


@pytest.fixture(scope="module")
def random_split():
    rng = np.random.default_rng(7)
    n_images = 300
    # imbalanced grades so that weighted and macro F1 differ
    targets = rng.choice(5, size=(n_images, 6), p=[0.45, 0.25, 0.12, 0.08, 0.10])
    logits = rng.normal(size=(n_images, 6, NUM_CLASSES))
    logits[np.arange(n_images)[:, None], np.arange(6), targets] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return probs, targets


def test_pooled_and_zone_grade_metrics_match_sklearn(random_split):
    probs, targets = random_split
    metrics = compute_metrics(probs, targets)
    predictions = probs.argmax(axis=-1)

    graded = targets != UNKNOWN_CLASS
    y_true, y_pred = targets[graded], predictions[graded]
    assert metrics["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, labels=GRADE_LABELS, average="macro"))
    assert metrics["f1_weighted"] == pytest.approx(f1_score(y_true, y_pred, labels=GRADE_LABELS, average="weighted"))
    assert metrics["f1_weighted"] != pytest.approx(metrics["f1_macro"])
    assert metrics["precision_macro"] == pytest.approx(
        precision_score(y_true, y_pred, labels=GRADE_LABELS, average="macro", zero_division=0))
    assert metrics["recall_macro"] == pytest.approx(recall_score(y_true, y_pred, labels=GRADE_LABELS, average="macro"))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert metrics["n_graded_zones"] == graded.sum()
    assert metrics["n_images"] == 300

    zone_f1 = []
    for zone, name in enumerate(ZONE_NAMES):
        mask = graded[:, zone]
        zone_true, zone_pred = targets[mask, zone], predictions[mask, zone]
        zone_f1.append(f1_score(zone_true, zone_pred, labels=GRADE_LABELS, average="macro"))
        assert metrics[f"{name}/f1_macro"] == pytest.approx(zone_f1[-1])
        assert metrics[f"{name}/f1_weighted"] == pytest.approx(
            f1_score(zone_true, zone_pred, labels=GRADE_LABELS, average="weighted"))
        assert metrics[f"{name}/recall_macro"] == pytest.approx(
            recall_score(zone_true, zone_pred, labels=GRADE_LABELS, average="macro"))
        assert metrics[f"{name}/precision_macro"] == pytest.approx(
            precision_score(zone_true, zone_pred, labels=GRADE_LABELS, average="macro", zero_division=0))
        assert metrics[f"{name}/accuracy"] == pytest.approx(accuracy_score(zone_true, zone_pred))
        assert metrics[f"{name}/support"] == mask.sum()
    assert metrics["f1_macro_zone_mean"] == pytest.approx(np.mean(zone_f1))

    is_unknown, predicted_unknown = targets.ravel() == 4, predictions.ravel() == 4
    assert metrics["unknown_recall"] == pytest.approx(recall_score(is_unknown, predicted_unknown))
    assert metrics["unknown_precision"] == pytest.approx(precision_score(is_unknown, predicted_unknown))


def test_csi_metrics_match_numpy_and_scipy(random_split):
    probs, targets = random_split
    rng = np.random.default_rng(3)
    csv_csi = rng.uniform(0, 3, size=len(targets))
    csv_csi[::10] = np.nan
    metrics = compute_metrics(probs, targets, csi_truth=csv_csi)
    predictions = probs.argmax(axis=-1)

    def row_mean(row):
        graded = [value for value in row if value != 4]
        return np.mean(graded) if graded else np.nan

    true_avg = np.array([row_mean(row) for row in targets])
    pred_avg = np.array([row_mean(row) for row in predictions])
    keep = ~np.isnan(true_avg) & ~np.isnan(pred_avg)
    assert metrics["csi_n_images"] == keep.sum()
    assert metrics["csi_mae"] == pytest.approx(np.mean(np.abs(pred_avg[keep] - true_avg[keep])))
    assert metrics["csi_rmse"] == pytest.approx(np.sqrt(np.mean((pred_avg[keep] - true_avg[keep]) ** 2)))
    assert metrics["csi_pearson_r"] == pytest.approx(pearsonr(true_avg[keep], pred_avg[keep])[0])

    keep_csv = ~np.isnan(csv_csi) & ~np.isnan(pred_avg)
    assert metrics["csi_csv_n_images"] == keep_csv.sum()
    assert metrics["csi_csv_mae"] == pytest.approx(np.mean(np.abs(pred_avg[keep_csv] - csv_csi[keep_csv])))
    assert metrics["csi_csv_rmse"] == pytest.approx(np.sqrt(np.mean((pred_avg[keep_csv] - csv_csi[keep_csv]) ** 2)))
    assert metrics["csi_csv_pearson_r"] == pytest.approx(pearsonr(csv_csi[keep_csv], pred_avg[keep_csv])[0])


def test_confusion_matrices_match_sklearn(random_split):
    probs, targets = random_split
    matrices = confusion_matrices(probs, targets)
    predictions = probs.argmax(axis=-1)
    assert set(matrices) == {*ZONE_NAMES, "pooled"}
    for zone, name in enumerate(ZONE_NAMES):
        np.testing.assert_array_equal(matrices[name],
                                      confusion_matrix(targets[:, zone], predictions[:, zone], labels=range(5)))
    np.testing.assert_array_equal(matrices["pooled"],
                                  confusion_matrix(targets.ravel(), predictions.ravel(), labels=range(5)))
    assert matrices["pooled"].sum() == targets.size


def test_perfect_predictions_give_f1_one_despite_unknown_zones():
    targets = np.array([[0, 1, 2, 3, 4, 4], [1, 1, 0, 2, 3, 4], [3, 3, 2, 2, 1, 0]])
    metrics = compute_metrics(probs_for(targets), targets)
    for key in ("f1_macro", "f1_weighted", "precision_macro", "recall_macro", "accuracy", "f1_macro_zone_mean",
                "unknown_recall", "unknown_precision", "ahf_accuracy", "ahf_f1_macro"):
        assert metrics[key] == 1.0, key
    assert metrics["csi_mae"] == 0.0
    assert metrics["csi_pearson_r"] == pytest.approx(1.0)


def test_predicted_unknown_on_graded_target_lowers_recall_not_precision():
    targets = np.array([[0, 1, 2, 3, 0, 1], [1, 1, 2, 2, 3, 3]])
    predictions = targets.copy()
    predictions[0, 0] = UNKNOWN_CLASS  # one of the two grade-0 targets
    predictions[1, 0] = UNKNOWN_CLASS  # one of the four grade-1 targets
    metrics = compute_metrics(probs_for(predictions), targets)
    # recall per grade: 0 -> 1/2, 1 -> 3/4, 2 and 3 -> 1; no grade is predicted wrongly, so precision stays 1
    assert metrics["recall_macro"] == pytest.approx((1 / 2 + 3 / 4 + 1 + 1) / 4)
    assert metrics["precision_macro"] == 1.0
    assert metrics["accuracy"] == pytest.approx(10 / 12)
    assert metrics["unknown_recall"] != metrics["unknown_recall"]  # no unknown target: NaN
    assert metrics["unknown_precision"] == 0.0


def hand_example():
    """Five images; the two last have an undefined true (all unknown) or predicted (all predicted unknown) CSI."""
    targets = np.array([[0, 1, 1, 1, 4, 4],   # avg 3/4 = 0.75 -> low
                        [3, 2, 2, 2, 2, 4],   # avg 11/5 = 2.2 -> medium (inclusive bound)
                        [2, 2, 2, 2, 2, 2],   # avg 2 -> medium
                        [4, 4, 4, 4, 4, 4],   # no graded zone: excluded, not CSI 0
                        [1, 1, 1, 1, 2, 2]])
    predictions = np.array([[0, 1, 1, 2, 4, 1],   # avg 5/5 = 1.0 -> low
                            [3, 3, 2, 2, 2, 4],   # avg 12/5 = 2.4 -> high
                            [1, 1, 1, 1, 2, 2],   # avg 8/6 -> medium
                            [2, 2, 2, 2, 2, 2],
                            [4, 4, 4, 4, 4, 4]])  # nothing predicted graded: excluded
    return targets, predictions


def test_hand_computed_csi_and_ahf_excluding_undefined_averages():
    targets, predictions = hand_example()
    metrics = compute_metrics(probs_for(predictions), targets)
    truth = [Fraction(3, 4), Fraction(11, 5), Fraction(2)]
    predicted = [Fraction(1), Fraction(12, 5), Fraction(8, 6)]
    errors = [p - t for p, t in zip(predicted, truth)]
    assert metrics["csi_n_images"] == 3
    assert metrics["csi_mae"] == pytest.approx(float(sum(abs(e) for e in errors) / 3))
    assert metrics["csi_rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3))
    mean_t, mean_p = sum(truth) / 3, sum(predicted) / 3
    covariance = sum((t - mean_t) * (p - mean_p) for t, p in zip(truth, predicted))
    r = covariance / math.sqrt(sum((t - mean_t) ** 2 for t in truth) * sum((p - mean_p) ** 2 for p in predicted))
    assert metrics["csi_pearson_r"] == pytest.approx(float(r))
    # AHF truth [low, medium, medium], predicted [low, high, medium]
    assert metrics["ahf_accuracy"] == pytest.approx(2 / 3)
    assert metrics["ahf_f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_csi_average_and_ahf_class_at_exact_thresholds():
    averages = csi_average(np.array([[3, 2, 2, 2, 2, 4], [4, 4, 4, 4, 4, 4], [1, 1, 1, 2, 4, 4]]))
    np.testing.assert_array_equal(averages, [2.2, np.nan, 1.25])
    np.testing.assert_array_equal(ahf_classes(np.array([1.3, 1.3 + 1e-9, 2.2, 2.2 + 1e-9, np.nan, 0.0, 3.0])),
                                  [0, 1, 1, 2, -1, 0, 2])
    np.testing.assert_array_equal(ahf_classes(averages), [1, -1, 0])


def test_ahf_auroc_present_only_with_a_real_label():
    targets, predictions = hand_example()
    probs = probs_for(predictions)
    without = compute_metrics(probs, targets)
    assert "ahf_auroc" not in without and "csi_csv_mae" not in without

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(40, 6))
    targets = rng.integers(0, 5, size=(40, 6))
    labels = (rng.random(40) < 0.4).astype(float)
    labels[:5] = np.nan
    metrics = compute_metrics(probs, targets, ahf_truth=labels)
    expected_grade = (probs[..., :4] * np.arange(4)).sum(-1) / probs[..., :4].sum(-1)
    score = expected_grade.mean(axis=1)
    assert metrics["ahf_auroc_n_images"] == 35
    assert metrics["ahf_auroc"] == pytest.approx(roc_auc_score(labels[5:], score[5:]))

    assert math.isnan(compute_metrics(probs, targets, ahf_truth=np.ones(40))["ahf_auroc"])
    assert math.isnan(compute_metrics(probs, targets, ahf_truth=np.full(40, np.nan))["ahf_auroc"])
    with pytest.raises(ValueError, match="ahf_truth: expected 0, 1 or NaN"):
        compute_metrics(probs, targets, ahf_truth=np.full(40, 2.0))


def test_one_image_and_empty_split_give_nan_without_warnings():
    targets = np.array([[0, 1, 4, 4, 4, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = compute_metrics(probs_for(np.array([[0, 2, 4, 4, 4, 4]])), targets, csi_truth=np.array([0.5]))
        empty = compute_metrics(np.zeros((0, 6, 5)), np.zeros((0, 6), dtype=int))
    assert one["csi_n_images"] == 1 and math.isnan(one["csi_pearson_r"]) and math.isnan(one["csi_csv_pearson_r"])
    assert one["csi_mae"] == pytest.approx(0.5)
    assert one["f1_macro"] == pytest.approx(f1_score([0, 1], [0, 2], average="macro", zero_division=0))
    assert empty["n_images"] == 0 and math.isnan(empty["f1_weighted"]) and math.isnan(empty["csi_mae"])
    counts = {key for key in one if key.endswith(("n_images", "n_graded_zones", "/support"))}
    assert all(isinstance(one[key], int) for key in counts) and "n_images" in counts  # counts are integers
    assert all(isinstance(value, float) for key, value in one.items() if key not in counts)


def test_bad_shapes_and_classes_name_what_was_expected():
    with pytest.raises(ValueError, match=r"zone_probs: expected shape \(N, 6, 5\)"):
        compute_metrics(np.zeros((2, 6, 4)), np.zeros((2, 6), dtype=int))
    with pytest.raises(ValueError, match="zone_targets: expected classes 0-4, got 7 at image 1, zone left_sup"):
        compute_metrics(np.zeros((2, 6, 5)), np.array([[0] * 6, [0, 7, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="csi_truth: expected 2 values"):
        compute_metrics(np.zeros((2, 6, 5)), np.zeros((2, 6), dtype=int), csi_truth=np.zeros(3))
