"""The calibration metrics (calibration.calibration_metrics: ECE, classwise ECE, Brier, NLL, pooled and per zone)
under bootstrap resample weights, vectorised, so that intervals.bootstrap gives them intervals from the same resamples
as every other metric.

A resample is a (R, N) array of integer image weights (intervals.resample_weights). At integer weights every value
here is calibration_metrics of the dataset with each image repeated that many times (tests/test_calibration.py checks
it on random data, weights 0 and tied scores included, against calibration_metrics, which is checked against
scikit-learn), so there is one definition of each metric:

    brier, nll     weighted means of the per-prediction Brier term and -log p(target): one matrix product.
    ece            equal-mass bins: the edges are np.percentile (linear interpolation) of the REPEATED scores. Each
                   score vector is sorted once; under weights w the k-th element of the repeated sorted array is the
                   sorted score whose cumulative weight first exceeds k, so the edges follow from the cumulative
                   weights exactly as numpy interpolates them (same virtual index, same lerp). Predictions go to bins
                   by value (np.searchsorted on the inner edges, as calibration.equal_mass_bins), so every copy of a
                   prediction lands in one bin: a bin is a run of the sorted scores, and its weighted sums are
                   differences of cumulative sums. A bin's count x |accuracy - mean score| is |sum of w x (hit -
                   score)| over the bin, so one cumulative sum per score vector gives the ECE.
"""
from __future__ import annotations

import numpy as np

from csi_dist.core.domain import NUM_CLASSES, NUM_ZONES, ZONE_NAMES
from csi_dist.evaluation.calibration import METRIC_KEYS, N_BINS

KEYS = tuple(f"{prefix}{key}" for prefix in ("", *(f"{name}/" for name in ZONE_NAMES)) for key in METRIC_KEYS)

# the inner quantiles of calibration.equal_mass_bins, as np.percentile computes them (q / 100)
INNER_QUANTILES = np.true_divide(np.linspace(0, 1, N_BINS + 1) * 100, 100)[1:-1]


class CalibrationStatistics:
    """Per-prediction terms and sorted score vectors of calibration_metrics for resample weights."""

    def __init__(self, zone_probs: np.ndarray, zone_targets: np.ndarray):
        probs = np.asarray(zone_probs, dtype=np.float64).reshape(-1, NUM_ZONES, NUM_CLASSES)
        targets = np.asarray(zone_targets, dtype=np.int64).reshape(-1, NUM_ZONES)
        self.n_images = n_images = targets.shape[0]
        one_hot = np.eye(NUM_CLASSES)[targets]
        eps = np.finfo(np.float64).eps
        brier = ((probs - one_hot) ** 2).sum(axis=-1)  # (N, 6)
        nll = -np.log(np.clip(np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0], eps, 1 - eps))
        self.means = np.concatenate([brier, nll], axis=1)  # (N, 12): a weighted mean per column
        # key -> its score vectors (classwise: one a class); pooled rows are image-major: row i*6+z is image i zone z
        pooled_image = np.repeat(np.arange(n_images), NUM_ZONES)
        flat_probs, flat_targets = probs.reshape(-1, NUM_CLASSES), targets.reshape(-1)
        self.ece: dict[str, list[_SortedScores]] = {}
        for prefix, zone_p, zone_t, image in [("", flat_probs, flat_targets, pooled_image)] + [
                (f"{name}/", probs[:, zone], targets[:, zone], np.arange(n_images))
                for zone, name in enumerate(ZONE_NAMES)]:
            self.ece[f"{prefix}ece"] = [_SortedScores(zone_p.max(axis=1), zone_p.argmax(axis=1) == zone_t, image)]
            self.ece[f"{prefix}classwise_ece"] = [_SortedScores(zone_p[:, klass], zone_t == klass, image)
                                                  for klass in range(NUM_CLASSES)]

    def metrics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every calibration_metrics key under each row of (R, N) integer weights, as (R,) arrays (NaN where a
        resample weighs nothing)."""
        weights = np.asarray(weights)
        if np.any(weights != np.round(weights)) or np.any(weights < 0):
            raise ValueError("weights: expected non-negative whole numbers (resample counts)")
        total = weights.sum(axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            zone_means = (weights.astype(np.float64) @ self.means) / total[:, None]  # (R, 12)
        # small integer types: the gathers move less memory, and int32 cumulative sums (exact below 2**31) run
        # several times faster than float64 ones (3 s instead of 9 s for 1000 resamples of 10 000 images)
        counts = weights.astype(np.uint8 if weights.max(initial=0) < 256 else np.int64)
        cumulative_type = np.int32 if NUM_ZONES * total.sum() < 2 ** 31 else np.int64
        result: dict[str, np.ndarray] = {}
        for index, key in enumerate(("brier", "nll")):
            columns = zone_means[:, index * NUM_ZONES:(index + 1) * NUM_ZONES]
            result[key] = columns.mean(axis=1)  # every zone has the same weight: the pooled mean is the zones' mean
            result.update({f"{name}/{key}": columns[:, zone] for zone, name in enumerate(ZONE_NAMES)})
        for key, vectors in self.ece.items():
            result[key] = np.mean([vector.ece(counts, cumulative_type) for vector in vectors], axis=0)
        return {key: result[key] for key in KEYS}  # calibration_metrics' order


class _SortedScores:
    """One score vector of an ECE (confidences, or one class's probabilities), sorted once, with its hits and the
    image each score belongs to (whose weight it takes)."""

    def __init__(self, scores: np.ndarray, hits: np.ndarray, image: np.ndarray):
        order = np.argsort(scores, kind="stable")
        self.scores = scores[order]
        self.gap = hits[order].astype(np.float64) - self.scores  # hit - score of each sorted prediction
        self.image = image[order]

    def ece(self, weights: np.ndarray, cumulative_type=np.int64) -> np.ndarray:
        """The ECE under each row of (R, N) integer weights (numpy integers: their cumulative sums are exact)."""
        n_rows, size = weights.shape[0], self.scores.size
        if size == 0:
            return np.full(n_rows, np.nan)
        sorted_weights = np.take(weights, self.image, axis=1)  # (R, M)
        # one cumulative sum over the rows laid end to end: monotone, so one searchsorted finds every row's elements
        cumulative = np.cumsum(sorted_weights.ravel(), dtype=cumulative_type)
        row_end = cumulative[size - 1::size]
        row_start = np.r_[0, row_end[:-1]].astype(cumulative.dtype)
        total = row_end - row_start
        edges = self._inner_edges(cumulative, row_start, total)  # (R, N_BINS - 1)
        # bin b holds the sorted scores in (edge b-1, edge b]: it ends where the scores <= edge b end
        ends = np.searchsorted(self.scores, edges.ravel(), side="right").reshape(n_rows, -1)
        starts = np.concatenate([np.zeros((n_rows, 1), dtype=np.intp), ends], axis=1)  # (R, N_BINS)
        stops = np.concatenate([ends, np.full((n_rows, 1), size)], axis=1)
        # the weighted sum of (hit - score) of each bin, all rows at once; an empty bin sums nothing
        products = np.empty(n_rows * size + 1)
        np.multiply(sorted_weights, self.gap, out=products[:-1].reshape(n_rows, size))
        products[-1] = 0.0
        flat_starts = (starts + size * np.arange(n_rows)[:, None]).ravel()
        sums = np.where(stops > starts, np.add.reduceat(products, flat_starts).reshape(n_rows, -1), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, np.abs(sums).sum(axis=1) / total, np.nan)

    def _inner_edges(self, cumulative: np.ndarray, row_start: np.ndarray, total: np.ndarray) -> np.ndarray:
        """np.percentile(repeated scores, inner quantiles) of each row, computed as numpy does it (linear)."""
        count = np.maximum(total, 1)[:, None]
        virtual = (count - 1) * INNER_QUANTILES  # numpy: (n - 1) * quantiles, in float64
        previous = np.floor(virtual)
        gamma = virtual - previous
        above = virtual >= count - 1  # numpy takes the last element there (then a == b: gamma plays no part)
        previous = np.where(above, count - 1, previous).astype(cumulative.dtype)
        following = np.where(above, previous, previous + 1)
        # element k of row r's repeated sorted array: the first sorted score whose cumulative weight exceeds k
        size = self.scores.size
        offsets = row_start[:, None]
        low = np.searchsorted(cumulative, (previous + offsets).ravel(), side="right") - size * np.repeat(
            np.arange(previous.shape[0]), previous.shape[1])
        high = np.searchsorted(cumulative, (following + offsets).ravel(), side="right") - size * np.repeat(
            np.arange(previous.shape[0]), previous.shape[1])
        a = self.scores[np.clip(low, 0, size - 1)].reshape(previous.shape)
        b = self.scores[np.clip(high, 0, size - 1)].reshape(previous.shape)
        return _lerp(a, b, gamma)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's quantile interpolation (numpy.lib._function_base_impl._lerp), bit for bit."""
    difference = b - a
    result = a + difference * t
    return np.where(t >= 0.5, b - difference * (1 - t), result)
