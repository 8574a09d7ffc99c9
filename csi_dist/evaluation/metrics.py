"""Evaluation metrics of zone-wise CSI predictions, computed once over a whole (gathered, unpadded) dataset.

Inputs are the model's per-zone probabilities ``zone_probs`` (N, 6, 5), the zone targets ``zone_targets`` (N, 6)
coded as in :mod:`csi_dist.core.domain` (0-3 grades, 4 unknown), and optionally the CSV ``csi`` column and a real
binary AHF label (both (N,) floats, NaN where missing). Predictions are the argmax of the probabilities.

Keys returned by :func:`compute_metrics` (plain floats, counts as ints; NaN means "undefined on this data"):

Grades, pooled over all zones, on graded targets only (target 0-3). A predicted 4 on a graded target is an error:
it lowers recall and accuracy. Macro averages run over the grade labels present in those targets or their
predictions (never class 4, so an absent unknown class cannot cap them), with zero_division=0. NaN when the data
has no graded target.
    f1_macro, f1_weighted, precision_macro, recall_macro, accuracy
    f1_macro_zone_mean     mean of the per-zone f1_macro over zones that have graded targets
    unknown_recall         over all targets: predicted 4 among targets 4 (NaN when no target is 4)
    unknown_precision      over all targets: target 4 among predictions 4 (NaN when nothing is predicted 4)
    n_images, n_graded_zones
Per zone, for each name in domain.ZONE_NAMES, same definitions restricted to that zone:
    <zone>/f1_macro, <zone>/f1_weighted, <zone>/precision_macro, <zone>/recall_macro, <zone>/accuracy,
    <zone>/support         number of graded targets of the zone
CSI average per image (mean of the graded zones, see csi_average). Images whose true average (all targets unknown)
or predicted average (all six predicted unknown) is undefined are excluded, never counted as CSI 0:
    csi_mae, csi_rmse, csi_pearson_r, csi_n_images
Only when csi_truth is given: the same against the CSV csi column (images with a CSV value and a predicted average):
    csi_csv_mae, csi_csv_rmse, csi_csv_pearson_r, csi_csv_n_images
AHF risk class (domain.ahf_class of the average; 3 classes) on the csi_n_images images, truth = class of the true
average, macro over the classes present:
    ahf_accuracy, ahf_f1_macro
Only when ahf_truth is given: AUROC of the real 0/1 AHF label (NaN unless both classes occur among labelled images):
    ahf_auroc, ahf_auroc_n_images
The AUROC score is expected_csi (probability-weighted grade, renormalised over 0-3, averaged over zones) rather
than the argmax average: a ranking needs a continuous score (the argmax average takes few values, so ties flatten
the ROC), and it must exist for every image (the argmax average is NaN when every zone is predicted unknown).

Pearson r is NaN with fewer than 2 images or a constant input. Keys not listed above are never produced.
"""
from __future__ import annotations

import math

import numpy as np

from csi_dist.core.domain import GRADES, NUM_CLASSES, NUM_ZONES, UNKNOWN_CLASS, ZONE_NAMES, ahf_class

POOLED = "pooled"


def csi_average(zone_grades: np.ndarray) -> np.ndarray:
    """Per-image mean of the graded zones (values != 4) of an (N, 6) grade array; NaN where no zone is graded."""
    zone_grades = np.asarray(zone_grades)
    graded = zone_grades != UNKNOWN_CLASS
    n_graded = graded.sum(axis=1)
    total = np.where(graded, zone_grades, 0).sum(axis=1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_graded > 0, total / n_graded, np.nan)


def expected_csi(zone_probs: np.ndarray) -> np.ndarray:
    """Continuous predicted CSI per image: expected grade under the probabilities renormalised over grades 0-3,
    averaged over the zones (a zone with zero probability on every grade is left out; NaN if all are)."""
    grade_probs = np.asarray(zone_probs, dtype=float)[..., list(GRADES)]
    grade_mass = grade_probs.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        zone_expectation = np.where(grade_mass > 0, (grade_probs * np.asarray(GRADES)).sum(axis=-1) / grade_mass,
                                    np.nan)
    counts = np.isfinite(zone_expectation).sum(axis=1)
    total = np.nansum(zone_expectation, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, total / counts, np.nan)


def ahf_classes(csi_averages: np.ndarray) -> np.ndarray:
    """domain.ahf_class of each average: 0 low, 1 medium, 2 high, -1 where the average is NaN."""
    return np.array([ahf_class(float(value)) for value in np.asarray(csi_averages, dtype=float)], dtype=int)


def zone_predictions(zone_probs: np.ndarray) -> np.ndarray:
    """Predicted class per zone: argmax over the 5 probabilities, (N, 6) int."""
    return np.asarray(zone_probs).argmax(axis=-1)


def confusion_matrices(zone_probs: np.ndarray, zone_targets: np.ndarray) -> dict[str, np.ndarray]:
    """5x5 confusion matrix per zone name and "pooled" (sum over zones); rows = true class incl. unknown,
    columns = predicted class."""
    from sklearn.metrics import confusion_matrix  # scikit-learn takes ~1 s to load: only when metrics are asked
    zone_probs, zone_targets = _check_inputs(zone_probs, zone_targets)
    predictions = zone_predictions(zone_probs)
    labels = list(range(NUM_CLASSES))
    empty = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    # sklearn refuses empty inputs; an empty split still gets (all-zero) matrices
    matrices = {name: confusion_matrix(zone_targets[:, zone], predictions[:, zone], labels=labels)
                if len(zone_targets) else empty.copy() for zone, name in enumerate(ZONE_NAMES)}
    matrices[POOLED] = sum(matrices.values(), empty)
    return matrices


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; NaN for fewer than 2 pairs or a constant input (instead of a warning)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def compute_metrics(zone_probs: np.ndarray, zone_targets: np.ndarray, csi_truth: np.ndarray | None = None,
                    ahf_truth: np.ndarray | None = None) -> dict[str, float]:
    """All evaluation metrics of one split as a flat {key: float} dict; the keys are listed in the module docstring."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score  # ~1 s to load: only when used
    zone_probs, zone_targets = _check_inputs(zone_probs, zone_targets)
    n_images = zone_targets.shape[0]
    csi_truth = _check_per_image(csi_truth, n_images, "csi_truth")
    ahf_truth = _check_per_image(ahf_truth, n_images, "ahf_truth")
    if ahf_truth is not None:
        bad = ~np.isnan(ahf_truth) & ~np.isin(ahf_truth, (0.0, 1.0))
        if bad.any():
            raise ValueError(f"ahf_truth: expected 0, 1 or NaN, got {ahf_truth[bad][:5].tolist()} "
                             f"at image indices {np.flatnonzero(bad)[:5].tolist()}")
    predictions = zone_predictions(zone_probs)

    metrics: dict[str, float] = {"n_images": int(n_images)}
    pooled = _grade_metrics(zone_targets.ravel(), predictions.ravel())
    metrics["n_graded_zones"] = pooled.pop("support")
    metrics.update(pooled)
    zone_f1 = []
    for zone, name in enumerate(ZONE_NAMES):
        for key, value in _grade_metrics(zone_targets[:, zone], predictions[:, zone]).items():
            metrics[f"{name}/{key}"] = value
        zone_f1.append(metrics[f"{name}/f1_macro"])
    metrics["f1_macro_zone_mean"] = _nanmean(zone_f1)

    true_unknown = zone_targets.ravel() == UNKNOWN_CLASS
    pred_unknown = predictions.ravel() == UNKNOWN_CLASS
    both_unknown = float((true_unknown & pred_unknown).sum())
    metrics["unknown_recall"] = both_unknown / true_unknown.sum() if true_unknown.any() else math.nan
    metrics["unknown_precision"] = both_unknown / pred_unknown.sum() if pred_unknown.any() else math.nan

    true_average = csi_average(zone_targets)
    pred_average = csi_average(predictions)
    metrics.update(_regression_metrics("csi", true_average, pred_average))
    if csi_truth is not None:
        metrics.update(_regression_metrics("csi_csv", csi_truth, pred_average))

    both_defined = np.isfinite(true_average) & np.isfinite(pred_average)
    true_ahf = ahf_classes(true_average[both_defined])
    pred_ahf = ahf_classes(pred_average[both_defined])
    if both_defined.any():
        metrics["ahf_accuracy"] = float(accuracy_score(true_ahf, pred_ahf))
        metrics["ahf_f1_macro"] = float(f1_score(true_ahf, pred_ahf, average="macro", zero_division=0))
    else:
        metrics["ahf_accuracy"] = metrics["ahf_f1_macro"] = math.nan
    if ahf_truth is not None:
        score = expected_csi(zone_probs)
        labelled = np.isfinite(ahf_truth) & np.isfinite(score)
        metrics["ahf_auroc_n_images"] = int(labelled.sum())
        both_classes = np.unique(ahf_truth[labelled]).size == 2
        metrics["ahf_auroc"] = (float(roc_auc_score(ahf_truth[labelled], score[labelled])) if both_classes
                                else math.nan)
    return metrics


def _grade_metrics(targets: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """F1/precision/recall/accuracy over the graded targets of a flat target/prediction pair, plus their count."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support  # loaded when used
    graded = targets != UNKNOWN_CLASS
    targets, predictions = targets[graded], predictions[graded]
    if targets.size == 0:
        return {key: math.nan for key in ("f1_macro", "f1_weighted", "precision_macro", "recall_macro",
                                          "accuracy")} | {"support": 0}
    # grade labels only: a predicted 4 then counts as a miss of the true grade (recall) without adding an
    # unknown class whose empty support would drag every macro mean down
    labels = sorted(set(np.unique(targets).tolist()) | (set(np.unique(predictions).tolist()) - {UNKNOWN_CLASS}))
    precision, recall, f1_macro, _ = precision_recall_fscore_support(targets, predictions, labels=labels,
                                                                     average="macro", zero_division=0)
    return {"f1_macro": float(f1_macro),
            "f1_weighted": float(f1_score(targets, predictions, labels=labels, average="weighted", zero_division=0)),
            "precision_macro": float(precision), "recall_macro": float(recall),
            "accuracy": float(accuracy_score(targets, predictions)), "support": int(targets.size)}


def _regression_metrics(prefix: str, truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    defined = np.isfinite(truth) & np.isfinite(predicted)
    error = predicted[defined] - truth[defined]
    return {f"{prefix}_mae": float(np.abs(error).mean()) if error.size else math.nan,
            f"{prefix}_rmse": float(np.sqrt((error ** 2).mean())) if error.size else math.nan,
            f"{prefix}_pearson_r": pearson_r(truth[defined], predicted[defined]),
            f"{prefix}_n_images": int(defined.sum())}


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def _check_inputs(zone_probs: np.ndarray, zone_targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    zone_probs = np.asarray(zone_probs, dtype=float)
    zone_targets = np.asarray(zone_targets)
    if zone_probs.ndim != 3 or zone_probs.shape[1:] != (NUM_ZONES, NUM_CLASSES):
        raise ValueError(f"zone_probs: expected shape (N, {NUM_ZONES}, {NUM_CLASSES}), got {zone_probs.shape}")
    if zone_targets.shape != zone_probs.shape[:2]:
        raise ValueError(f"zone_targets: expected shape {zone_probs.shape[:2]} to match zone_probs, "
                         f"got {zone_targets.shape}")
    if zone_targets.size and not np.issubdtype(zone_targets.dtype, np.integer):
        if not np.all(np.mod(zone_targets, 1) == 0):
            raise ValueError("zone_targets: expected integer classes 0-4, got non-integer values")
    zone_targets = zone_targets.astype(np.int64)
    bad = (zone_targets < 0) | (zone_targets >= NUM_CLASSES)
    if bad.any():
        image, zone = np.argwhere(bad)[0]
        raise ValueError(f"zone_targets: expected classes 0-{NUM_CLASSES - 1}, got {zone_targets[image, zone]} "
                         f"at image {image}, zone {ZONE_NAMES[zone]}")
    return zone_probs, zone_targets


def _check_per_image(values: np.ndarray | None, n_images: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values, dtype=float).reshape(-1)
    if values.shape != (n_images,):
        raise ValueError(f"{name}: expected {n_images} values (one per image), got {values.shape[0]}")
    return values
