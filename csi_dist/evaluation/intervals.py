"""Bootstrap confidence intervals of every evaluation metric, resampling images or whole patients, vectorised.

A bootstrap resample is a vector of integer weights, one per image: how many times the image (or its patient, when
`groups` are given: every image of a patient drawn k times weighs k) was drawn. Every metric of
:func:`csi_dist.evaluation.metrics.compute_metrics` is a function of weighted sufficient statistics (weighted 5x5
confusion counts per zone, weighted 3x3 AHF counts, weighted sums of errors and moments, weighted Mann-Whitney counts
for the AUROC), so one matrix product per block of resamples gives all resamples at once. At integer weights these
are the metrics of the dataset with each image repeated that many times; tests/test_intervals.py checks that against
compute_metrics (scikit-learn) on repeated data, so the metric definitions stay those of metrics.py. The calibration
metrics (calibration.calibration_metrics: ECE, classwise ECE, Brier, NLL) follow from the same resample weights in
calibration_intervals.py (split_bootstrap, evaluate's, includes them).

Intervals are percentile intervals over the resamples in which the metric is defined (a resample may hold no graded
target of a zone, or one AHF class only); an interval is NaN (null in JSON) when fewer than
MIN_DEFINED_FRACTION of the resamples define the metric.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from csi_dist.core.domain import AHF_CLASS_NAMES, NUM_CLASSES, NUM_ZONES, UNKNOWN_CLASS, ZONE_NAMES
from csi_dist.evaluation.calibration_intervals import CalibrationStatistics
from csi_dist.evaluation.metrics import (_check_inputs, _check_per_image, ahf_classes, csi_average, expected_csi,
                                         zone_predictions)

log = logging.getLogger(__name__)

METHOD = "percentile"
MIN_DEFINED_FRACTION = 0.5
BLOCK = 64  # resamples per matrix product: a (64, N) float block is 5 MB at N = 10 000
GRADE_KEYS = ("f1_macro", "f1_weighted", "precision_macro", "recall_macro", "accuracy")
N_GRADES = UNKNOWN_CLASS  # grades 0..3
N_AHF = len(AHF_CLASS_NAMES)


def is_count_key(key: str) -> bool:
    """Keys of compute_metrics that count images or zones (no interval)."""
    return key.startswith("n_") or key.endswith(("n_images", "support"))


@dataclass
class BootstrapResult:
    """Percentile intervals of every non-count metric and what they rest on."""

    intervals: dict[str, tuple[float, float]]
    defined_resamples: dict[str, int]  # per key: resamples in which the metric was defined
    n_resamples: int
    seed: int
    level: float
    clustered_by: str | None  # "patient_id" when whole patients were resampled, else None (images)
    n_units: int  # images or patients resampled
    method: str = METHOD
    distributions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def description(self) -> str:
        """One sentence for a report saying what the intervals in brackets are."""
        units = (f"{self.n_units} patients (images without a patient id count as their own)" if self.clustered_by
                 else f"{self.n_units} images")
        return (f"In brackets: the {self.level:.0%} {self.method} bootstrap interval over {self.n_resamples} "
                f"resamples of the {units}, seed {self.seed}; (n/a) where fewer than "
                f"{MIN_DEFINED_FRACTION:.0%} of the resamples define the metric.")

    def summary(self) -> dict:
        """The JSON block written beside the point estimates (intervals as [low, high], NaN left for the writer)."""
        return {"method": self.method, "level": self.level, "n_resamples": self.n_resamples, "seed": self.seed,
                "resampled": "patients" if self.clustered_by else "images", "clustered_by": self.clustered_by,
                "n_resampled_units": self.n_units,
                "intervals": {key: [low, high] for key, (low, high) in self.intervals.items()},
                "defined_resamples": {key: count for key, count in self.defined_resamples.items()
                                      if count < self.n_resamples}}


def bootstrap_intervals(zone_probs: np.ndarray, zone_targets: np.ndarray, csi_truth: np.ndarray | None = None,
                        ahf_truth: np.ndarray | None = None, groups: Sequence | None = None, n_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """{key: (low, high)}: the `level` percentile interval of every non-count key of compute_metrics, resampling
    images, or whole groups (patients) when `groups` (one label per image; None or "" = a group of its own) is
    given. (NaN, NaN) where too few resamples define the metric."""
    return bootstrap(zone_probs, zone_targets, csi_truth, ahf_truth, groups, n_resamples, seed, level).intervals


def bootstrap(zone_probs: np.ndarray, zone_targets: np.ndarray, csi_truth: np.ndarray | None = None,
              ahf_truth: np.ndarray | None = None, groups: Sequence | None = None, n_resamples: int = 1000,
              seed: int = 0, level: float = 0.95, keep_distributions: bool = False,
              calibration: bool = False) -> BootstrapResult:
    """bootstrap_intervals with the counts of defined resamples and the settings (see BootstrapResult); with
    `calibration`, also the keys of calibration.calibration_metrics of these probabilities (pooled and per zone),
    from the same resamples (calibration_intervals.py)."""
    if not 0 < level < 1:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: expected at least 1, got {n_resamples}")
    statistics = SufficientStatistics(zone_probs, zone_targets, csi_truth, ahf_truth)
    units, n_units = group_codes(groups, statistics.n_images)
    datasets: list = [statistics]
    if calibration:
        datasets.append(CalibrationStatistics(zone_probs, zone_targets))
    distributions = {}
    for part in resampled_metrics(datasets, units, n_units, n_resamples, seed):  # the same weights for each part
        distributions.update(part)
    intervals, defined = {}, {}
    for key, values in distributions.items():
        intervals[key], defined[key] = percentile_interval(values, level)
    return BootstrapResult(intervals, defined, n_resamples, seed, level, "patient_id" if groups is not None else None,
                           n_units, distributions=distributions if keep_distributions else {})


def percentile_interval(values: np.ndarray, level: float) -> tuple[tuple[float, float], int]:
    """((low, high), number of finite values): the central `level` percentile interval of the finite values."""
    finite = values[np.isfinite(values)]
    if finite.size == 0 or finite.size < MIN_DEFINED_FRACTION * values.size:
        return (math.nan, math.nan), int(finite.size)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return (float(low), float(high)), int(finite.size)


def group_codes(groups: Sequence | None, n_images: int) -> tuple[np.ndarray, int]:
    """(resampling unit of each image, number of units): images, or groups with None/NaN/"" each its own unit."""
    if groups is None:
        return np.arange(n_images), n_images
    groups = list(groups)
    if len(groups) != n_images:
        raise ValueError(f"groups: expected {n_images} labels (one per image), got {len(groups)}")
    codes: dict[str, int] = {}
    units = np.empty(n_images, dtype=np.int64)
    for image, label in enumerate(groups):
        if label is None or label == "" or (isinstance(label, float) and math.isnan(label)):
            label = ("image", image)  # an image without a patient is a patient of its own
        units[image] = codes.setdefault(label, len(codes))
    return units, len(codes)


def resample_weights(units: np.ndarray, n_units: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of (resamples, images) float weights: each resample draws n_units units with replacement, and an
    image weighs the number of times its unit was drawn. The same seed gives the same resamples."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, BLOCK):
        block = min(BLOCK, n_resamples - start)
        drawn = rng.integers(0, n_units, size=(block, n_units)) if n_units else np.zeros((block, 0), dtype=np.int64)
        counts = np.bincount((drawn + n_units * np.arange(block)[:, None]).ravel(),
                             minlength=block * n_units).reshape(block, n_units)
        yield counts[:, units].astype(float)


def resampled_metrics(statistics: list, units: np.ndarray, n_units: int, n_resamples: int,
                      seed: int) -> list[dict[str, np.ndarray]]:
    """For each dataset of `statistics` (SufficientStatistics or CalibrationStatistics of the same images, e.g. two
    runs' predictions: paired), every non-count metric in every resample, {key: (n_resamples,) array, NaN where undefined}."""
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency
    blocks: list[list[dict[str, np.ndarray]]] = [[] for _ in statistics]
    # one BLAS thread: the products are small, and on a busy machine (CI's pytest workers) threads cost 5x the CPU
    with threadpool_limits(limits=1, user_api="blas"):
        for weights in resample_weights(units, n_units, n_resamples, seed):
            for parts, dataset in zip(blocks, statistics):
                parts.append(dataset.metrics(weights))
    return [{key: np.concatenate([part[key] for part in parts]) for key in parts[0]} for parts in blocks]


class SufficientStatistics:
    """Per-image features from which every compute_metrics value follows as a weighted sum (see module docstring)."""

    def __init__(self, zone_probs: np.ndarray, zone_targets: np.ndarray, csi_truth: np.ndarray | None = None,
                 ahf_truth: np.ndarray | None = None):
        zone_probs, zone_targets = _check_inputs(zone_probs, zone_targets)
        self.n_images = n_images = zone_targets.shape[0]
        csi_truth = _check_per_image(csi_truth, n_images, "csi_truth")
        ahf_truth = _check_per_image(ahf_truth, n_images, "ahf_truth")
        predictions = zone_predictions(zone_probs)
        # one column per (zone, true class, predicted class): the zone's confusion cell of each image
        cells = np.zeros((n_images, NUM_ZONES, NUM_CLASSES * NUM_CLASSES))
        cell = zone_targets * NUM_CLASSES + predictions
        np.put_along_axis(cells, cell[..., None], 1.0, axis=-1)
        columns = [cells.reshape(n_images, NUM_ZONES * NUM_CLASSES * NUM_CLASSES)]
        true_average, pred_average = csi_average(zone_targets), csi_average(predictions)
        self.regressions = {"csi": _Regression(true_average, pred_average)}
        if csi_truth is not None:
            self.regressions["csi_csv"] = _Regression(csi_truth, pred_average)
        for regression in self.regressions.values():
            columns.append(regression.features)
        defined = np.isfinite(true_average) & np.isfinite(pred_average)
        ahf_cells = np.zeros((n_images, N_AHF * N_AHF))
        ahf_cell = ahf_classes(np.where(defined, true_average, 0)) * N_AHF + ahf_classes(
            np.where(defined, pred_average, 0))
        ahf_cells[np.flatnonzero(defined), ahf_cell[defined]] = 1.0
        columns.append(ahf_cells)
        self.features = np.concatenate(columns, axis=1)
        self.auroc = None if ahf_truth is None else _Auroc(expected_csi(zone_probs), ahf_truth)

    def metrics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every non-count metric of compute_metrics under each row of (R, N) weights, as (R,) arrays."""
        sums = weights @ self.features
        n_cells = NUM_ZONES * NUM_CLASSES * NUM_CLASSES
        confusion = sums[:, :n_cells].reshape(-1, NUM_ZONES, NUM_CLASSES, NUM_CLASSES)
        pooled = confusion.sum(axis=1)
        # the six zones and the pooled matrix in one call: (R * 7, 5, 5)
        stacked = np.concatenate([confusion, pooled[:, None]], axis=1).reshape(-1, NUM_CLASSES, NUM_CLASSES)
        per_matrix = {key: values.reshape(-1, NUM_ZONES + 1) for key, values in grade_metrics(stacked).items()}
        result = {key: values[:, NUM_ZONES] for key, values in per_matrix.items()}
        for zone, name in enumerate(ZONE_NAMES):
            result.update({f"{name}/{key}": values[:, zone] for key, values in per_matrix.items()})
        zone_f1 = per_matrix["f1_macro"][:, :NUM_ZONES]
        with np.errstate(invalid="ignore", divide="ignore"):
            finite = np.isfinite(zone_f1)
            result["f1_macro_zone_mean"] = np.where(finite, zone_f1, 0).sum(axis=1) / finite.sum(axis=1)
            both_unknown = pooled[:, UNKNOWN_CLASS, UNKNOWN_CLASS]
            result["unknown_recall"] = _ratio(both_unknown, pooled[:, UNKNOWN_CLASS, :].sum(axis=1))
            result["unknown_precision"] = _ratio(both_unknown, pooled[:, :, UNKNOWN_CLASS].sum(axis=1))
        start = n_cells
        for prefix, regression in self.regressions.items():
            width = regression.features.shape[1]
            result.update(regression.metrics(prefix, sums[:, start:start + width], weights))
            start += width
        ahf = sums[:, start:start + N_AHF * N_AHF].reshape(-1, N_AHF, N_AHF)
        result.update(ahf_metrics(ahf))
        if self.auroc is not None:
            result["ahf_auroc"] = self.auroc.metric(weights)
        return result


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / denominator, np.nan)


def _f1_parts(confusion: np.ndarray, counted_predictions: int) -> tuple[np.ndarray, ...]:
    """Per-label (tp, support, predicted, present) of (R, L, C) weighted confusion counts (rows = true labels,
    columns = predictions; the first `counted_predictions` columns are labels, the rest count as misses)."""
    labels = confusion.shape[1]
    tp = np.diagonal(confusion[:, :, :labels], axis1=1, axis2=2)
    support = confusion.sum(axis=2)
    predicted = confusion[:, :, :counted_predictions].sum(axis=1)
    present = (support > 0) | (predicted > 0)
    return tp, support, predicted, present


def _macro(per_label: np.ndarray, present: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, per_label, 0).sum(axis=1) / present.sum(axis=1)


def grade_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """metrics._grade_metrics from (R, 5, 5) weighted confusion counts (rows true, columns predicted): graded rows
    only, a predicted unknown a miss, macro over the grades present in targets or predictions, zero_division=0."""
    graded = confusion[:, :N_GRADES, :]
    tp, support, predicted, present = _f1_parts(graded, N_GRADES)
    total = support.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        values = {"f1_macro": _macro(f1, present), "f1_weighted": (f1 * support).sum(axis=1) / total,
                  "precision_macro": _macro(precision, present), "recall_macro": _macro(recall, present),
                  "accuracy": tp.sum(axis=1) / total}
    return {key: np.where(total > 0, values[key], np.nan) for key in GRADE_KEYS}


def ahf_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """ahf_accuracy and ahf_f1_macro (macro over the classes present) from (R, 3, 3) weighted AHF counts."""
    tp, support, predicted, present = _f1_parts(confusion, N_AHF)
    total = support.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        return {"ahf_accuracy": np.where(total > 0, tp.sum(axis=1) / total, np.nan),
                "ahf_f1_macro": np.where(total > 0, _macro(f1, present), np.nan)}


class _Regression:
    """MAE, RMSE and Pearson r of a prediction against a truth over the images where both are defined."""

    def __init__(self, truth: np.ndarray, predicted: np.ndarray):
        self.defined = np.isfinite(truth) & np.isfinite(predicted)
        # centred on the defined images' mean, so the moments below lose no precision to cancellation
        x = np.where(self.defined, truth - (truth[self.defined].mean() if self.defined.any() else 0), 0.0)
        y = np.where(self.defined, predicted - (predicted[self.defined].mean() if self.defined.any() else 0), 0.0)
        error = np.where(self.defined, predicted - truth, 0.0)
        self.x, self.y = x, y
        self.features = np.stack([self.defined.astype(float), np.abs(error), error ** 2, x, y, x * x, y * y, x * y],
                                 axis=1)

    def metrics(self, prefix: str, sums: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
        count, abs_sum, square_sum, x_sum, y_sum, xx, yy, xy = sums.T
        with np.errstate(invalid="ignore", divide="ignore"):
            mae = np.where(count > 0, abs_sum / count, np.nan)
            rmse = np.where(count > 0, np.sqrt(square_sum / count), np.nan)
            x_var = xx - x_sum * x_sum / count
            y_var = yy - y_sum * y_sum / count
            r = (xy - x_sum * y_sum / count) / np.sqrt(x_var * y_var)
        # Pearson r is undefined with fewer than 2 images drawn or a constant side (decided exactly, not from a
        # variance that rounding leaves a hair above zero)
        drawn = (weights > 0) & self.defined
        n_drawn = drawn.sum(axis=1)
        constant = (_drawn_range(self.x, drawn) == 0) | (_drawn_range(self.y, drawn) == 0)
        r = np.where((n_drawn >= 2) & ~constant, np.clip(r, -1.0, 1.0), np.nan)
        return {f"{prefix}_mae": mae, f"{prefix}_rmse": rmse, f"{prefix}_pearson_r": r}


def _drawn_range(values: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    high = np.where(drawn, values, -np.inf).max(axis=1, initial=-np.inf)
    low = np.where(drawn, values, np.inf).min(axis=1, initial=np.inf)
    return np.where(drawn.any(axis=1), high - low, 0.0)


class _Auroc:
    """Weighted Mann-Whitney AUROC of a score against 0/1 labels (ties count one half, as roc_auc_score's
    trapezoids do)."""

    def __init__(self, score: np.ndarray, labels: np.ndarray):
        labelled = np.flatnonzero(np.isfinite(labels) & np.isfinite(score))
        order = labelled[np.argsort(score[labelled], kind="stable")]
        self.order = order
        self.positive = labels[order] == 1
        sorted_score = score[order]
        self.level_starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]]) if order.size else \
            np.zeros(0, dtype=np.int64)

    def metric(self, weights: np.ndarray) -> np.ndarray:
        if self.order.size == 0:
            return np.full(weights.shape[0], np.nan)
        sorted_weights = weights[:, self.order]
        positive = np.add.reduceat(np.where(self.positive, sorted_weights, 0), self.level_starts, axis=1)
        negative = np.add.reduceat(np.where(self.positive, 0, sorted_weights), self.level_starts, axis=1)
        negatives_below = np.cumsum(negative, axis=1) - negative
        wins = (positive * (negatives_below + 0.5 * negative)).sum(axis=1)
        total = positive.sum(axis=1) * negative.sum(axis=1)
        return _ratio(wins, total)


# ------------------------------------------------------------------------------------------- tables of the report


def format_estimate(value, interval: tuple[float, float] | None = None, is_count: bool = False) -> str:
    """A metric as the report shows it: "n/a" when undefined, a count as a whole number, "0.812 (0.781-0.840)"
    with its interval (" to " between the bounds when one is negative), else 4 decimals."""
    if value is None or math.isnan(float(value)):
        return "n/a"
    if is_count:
        return str(int(value))
    if interval is None:
        return f"{float(value):.4f}"
    low, high = interval
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{float(value):.3f} (n/a)"
    between = " to " if min(low, high) < 0 else "-"
    return f"{float(value):.3f} ({low:.3f}{between}{high:.3f})"


def metrics_rows(metrics: dict, intervals: dict[str, tuple[float, float]] | None) -> list[dict]:
    """Rows metric, estimate, ci_low, ci_high of every metric (NaN bounds for counts and without intervals)."""
    intervals = intervals or {}
    return [{"metric": key, "estimate": value, "ci_low": intervals.get(key, (math.nan, math.nan))[0],
             "ci_high": intervals.get(key, (math.nan, math.nan))[1]} for key, value in metrics.items()]


def split_bootstrap(predictions, n_resamples: int, seed: int, level: float = 0.95) -> BootstrapResult | None:
    """The intervals of one split's gathered predictions (inference.SplitPredictions), resampling patients when
    the shards know any (an image without one is its own patient), else images; None when n_resamples is 0. The
    calibration metrics of the probabilities in `predictions` (those in use) are among them."""
    if not n_resamples:
        return None
    patient_ids = list(getattr(predictions, "patient_ids", None) or [])
    groups = patient_ids if any(patient is not None for patient in patient_ids) else None
    started = time.perf_counter()
    result = bootstrap(predictions.zone_probs, predictions.zone_targets, predictions.csi_truth, predictions.ahf_truth,
                       groups=groups, n_resamples=n_resamples, seed=seed, level=level, calibration=True)
    log.info("bootstrap intervals: %d resamples of %d %s in %.1f s", n_resamples, result.n_units,
             "patients" if groups is not None else "images", time.perf_counter() - started)
    return result
