"""Calibration of the zone probabilities: ECE, classwise ECE, Brier score and NLL per zone and pooled, reliability
diagrams, and temperature scaling (one temperature per zone, fitted on the val split, stored beside the weights).

Which targets and classes. Every zone target counts, unknown (4) included, over all 5 classes: the model is trained
as a 5-way classifier, `p_unknown` is one of the probabilities users read (predictions CSV), and an unknown zone is
a real outcome the model must put probability on. Leaving the unknown targets out would score a distribution over 5
classes against 4 of them (the metrics' grade-only view is about argmax errors, not about probabilities).

Metrics (all from the probabilities of one split, `calibration_metrics`; pooled = every zone prediction of every
image together, and per zone as `<zone>/<key>`):
    ece            top-label ECE: the confidence is the largest of the 5 probabilities, correct means its class is
                   the target; N_BINS equal-mass bins (edges at the quantiles of the confidences, ties kept together,
                   scikit-learn's calibration_curve(strategy="quantile") rule); sum over bins of
                   (bin share of predictions) x |accuracy - mean confidence|
    classwise_ece  mean over the 5 classes (unknown included, as a class like the grades: it is predicted and read
                   like them) of the binary ECE of p_class against "target is that class", N_BINS equal-mass bins
                   of p_class each (Kull et al. 2019)
    brier          multiclass Brier score: mean over predictions of sum over the 5 classes of (p - one-hot)^2, 0..2
    nll            mean of -log p(target class) (p clipped at float64 eps, as scikit-learn's log_loss)

Temperature scaling (Guo et al. 2017): calibrated probabilities of zone z are softmax(logits[:, z, :] / T[z]),
computed in float64 from the float32 logits. T[z] minimises the NLL of zone z on the val split (scipy's bounded
scalar minimiser over log T in TEMPERATURE_BOUNDS); dividing by T > 0 keeps the order of the logits, so the argmax,
and every metric built on it, stays the same (ties among the top logits stay ties; a tie can appear only between
two logits closer than about 1e-15 x T). The fitted temperatures go to `<weights stem>.calibration.json` beside the
weights (calibration_path), with the sha256 of the weights they belong to; `read_calibration` refuses a file of other
weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csi_dist.core.domain import CLASS_NAMES, NUM_CLASSES, NUM_ZONES, ZONE_NAMES
from csi_dist.core.files import atomic_write_json, file_sha256
from csi_dist.core.run_dir import calibration_beside

log = logging.getLogger(__name__)

N_BINS = 10  # equal-mass bins: 10 keeps >= 2 predictions per bin on a zone of a 24-image val split
TEMPERATURE_BOUNDS = (0.05, 20.0)
METRIC_KEYS = ("ece", "classwise_ece", "brier", "nll")
RAW, CALIBRATED = "raw", "calibrated"
FILE_KEYS = ("zone_names", "temperatures", "fitted_on", "weights_sha256", "nll_before", "nll_after")


class CalibrationError(Exception):
    """No usable calibration for the weights asked for: missing, damaged, or fitted for other weights."""


# ---------------------------------------------------------------------------------------------------- metrics


def zone_softmax(zone_logits: np.ndarray, temperatures: np.ndarray | None = None) -> np.ndarray:
    """float64 softmax over the classes of (N, 6, 5) logits, each zone's logits divided by its temperature."""
    from scipy.special import softmax
    logits = np.asarray(zone_logits, dtype=np.float64)
    if temperatures is not None:
        logits = logits / np.asarray(temperatures, dtype=np.float64).reshape(1, -1, 1)
    return softmax(logits, axis=-1)


def equal_mass_bins(scores: np.ndarray, n_bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    """(bin index of each score, the n_bins + 1 edges): edges at the score quantiles, a score on an inner edge in
    the lower bin; equal edges (ties) leave bins empty. scikit-learn's calibration_curve(strategy="quantile")."""
    edges = np.percentile(scores, np.linspace(0, 1, n_bins + 1) * 100)
    return np.searchsorted(edges[1:-1], scores), edges


@dataclass
class ReliabilityBins:
    """The non-empty equal-mass bins of (score, hit) pairs: mean score, fraction of hits, count, edges."""

    mean_score: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    lower: np.ndarray
    upper: np.ndarray

    @property
    def error(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - mean score|, NaN without predictions."""
        total = self.count.sum()
        return float((self.count * np.abs(self.accuracy - self.mean_score)).sum() / total) if total else math.nan


def reliability_bins(scores: np.ndarray, hits: np.ndarray, n_bins: int = N_BINS) -> ReliabilityBins:
    scores, hits = np.asarray(scores, dtype=float).ravel(), np.asarray(hits, dtype=float).ravel()
    if scores.size == 0:
        empty = np.zeros(0)
        return ReliabilityBins(empty, empty, np.zeros(0, dtype=np.int64), empty, empty)
    ids, edges = equal_mass_bins(scores, n_bins)
    count = np.bincount(ids, minlength=n_bins)
    score_sum = np.bincount(ids, weights=scores, minlength=n_bins)
    hit_sum = np.bincount(ids, weights=hits, minlength=n_bins)
    kept = count > 0
    return ReliabilityBins(score_sum[kept] / count[kept], hit_sum[kept] / count[kept], count[kept],
                           edges[:-1][kept], edges[1:][kept])


def top_label_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE of the largest probability of each (M, 5) row against whether its class is the target."""
    return reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == targets, n_bins).error


def classwise_ece(probs: np.ndarray, targets: np.ndarray, n_bins: int = N_BINS) -> float:
    """Mean over the 5 classes of the binary ECE of p_class against target == class."""
    if probs.shape[0] == 0:
        return math.nan
    return float(np.mean([reliability_bins(probs[:, klass], targets == klass, n_bins).error
                          for klass in range(NUM_CLASSES)]))


def brier_score(probs: np.ndarray, targets: np.ndarray) -> float:
    if probs.shape[0] == 0:
        return math.nan
    return float(((probs - np.eye(NUM_CLASSES)[targets]) ** 2).sum(axis=1).mean())


def negative_log_likelihood(probs: np.ndarray, targets: np.ndarray) -> float:
    if probs.shape[0] == 0:
        return math.nan
    eps = np.finfo(np.float64).eps
    return float(-np.log(np.clip(probs[np.arange(len(targets)), targets], eps, 1 - eps)).mean())


def calibration_metrics(zone_probs: np.ndarray, zone_targets: np.ndarray, n_bins: int = N_BINS) -> dict[str, float]:
    """METRIC_KEYS pooled over zones, and `<zone>/<key>` per zone, of (N, 6, 5) probabilities and (N, 6) targets."""
    zone_probs = np.asarray(zone_probs, dtype=np.float64)
    zone_targets = np.asarray(zone_targets, dtype=np.int64)
    metrics = _metrics(zone_probs.reshape(-1, NUM_CLASSES), zone_targets.reshape(-1), n_bins, "")
    for zone, name in enumerate(ZONE_NAMES):
        metrics.update(_metrics(zone_probs[:, zone], zone_targets[:, zone], n_bins, f"{name}/"))
    return metrics


def _metrics(probs: np.ndarray, targets: np.ndarray, n_bins: int, prefix: str) -> dict[str, float]:
    return {f"{prefix}ece": top_label_ece(probs, targets, n_bins),
            f"{prefix}classwise_ece": classwise_ece(probs, targets, n_bins),
            f"{prefix}brier": brier_score(probs, targets), f"{prefix}nll": negative_log_likelihood(probs, targets)}


# ---------------------------------------------------------------------------------------------------- temperatures


def zone_nll(zone_logits: np.ndarray, zone_targets: np.ndarray, temperatures: np.ndarray | None = None) -> float:
    """Mean -log p(target) over every zone prediction, from the logits (exact where a probability underflows)."""
    from scipy.special import log_softmax
    logits = np.asarray(zone_logits, dtype=np.float64).reshape(-1, NUM_ZONES, NUM_CLASSES)
    if temperatures is not None:
        logits = logits / np.asarray(temperatures, dtype=np.float64).reshape(1, -1, 1)
    targets = np.asarray(zone_targets, dtype=np.int64)
    if targets.size == 0:
        return math.nan
    return float(-np.take_along_axis(log_softmax(logits, axis=-1), targets[..., None], axis=-1).mean())


def fit_temperatures(zone_logits: np.ndarray, zone_targets: np.ndarray,
                     bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> np.ndarray:
    """One temperature per zone minimising that zone's NLL (1.0 for a zone without predictions, or where the
    minimiser does not beat 1.0). The NLL is convex in 1/T, so the bounded search finds its minimum."""
    from scipy.optimize import minimize_scalar
    logits = np.asarray(zone_logits, dtype=np.float64)
    targets = np.asarray(zone_targets, dtype=np.int64)
    temperatures = np.ones(NUM_ZONES)
    for zone in range(NUM_ZONES):
        if targets.shape[0] == 0:
            continue

        def nll(log_temperature: float, zone: int = zone) -> float:
            return _single_zone_nll(logits[:, zone], targets[:, zone], math.exp(log_temperature))

        result = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                                 options={"xatol": 1e-6})
        if result.fun < nll(0.0):
            temperatures[zone] = math.exp(result.x)
        if temperatures[zone] != 1.0 and min(abs(result.x - math.log(bound)) for bound in bounds) < 1e-3:
            log.warning("zone %s: the fitted temperature %.3g is at the bound of %s (a very small or separable val "
                        "split?)", ZONE_NAMES[zone], temperatures[zone], bounds)
    return temperatures


def _single_zone_nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    from scipy.special import log_softmax
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(targets)), targets].mean())


# ---------------------------------------------------------------------------------------------------- the file


def calibration_path(weights_file: Path) -> Path:
    """`<stem>.calibration.json` beside `<stem>.safetensors`."""
    return calibration_beside(weights_file)


def fit_calibration(weights_file: Path, zone_logits: np.ndarray, zone_targets: np.ndarray, fitted_on: dict) -> dict:
    """Fit the temperatures of `weights_file` on these (val) predictions and store them beside it (a folder that
    cannot be written is logged: the temperatures are then used for this evaluation only)."""
    temperatures = fit_temperatures(zone_logits, zone_targets)
    try:
        record = write_calibration(weights_file, temperatures, fitted_on, zone_nll(zone_logits, zone_targets),
                                   zone_nll(zone_logits, zone_targets, temperatures))
    except OSError as error:
        log.warning("the temperatures cannot be stored beside %s (%s): used for this evaluation only, so "
                    "--calibrated cannot use them later", weights_file, error)
        return {"zone_names": list(ZONE_NAMES), "temperatures": [float(value) for value in temperatures],
                "fitted_on": fitted_on, "weights_sha256": None, "nll_before": zone_nll(zone_logits, zone_targets),
                "nll_after": zone_nll(zone_logits, zone_targets, temperatures)}
    log.info("temperatures of %s fitted on %d %s images: %s (NLL %.4f -> %.4f), in %s", Path(weights_file).name,
             len(zone_targets), fitted_on.get("split"), ", ".join(f"{name} {value:.3f}" for name, value in
                                                                   zip(ZONE_NAMES, temperatures)),
             record["nll_before"], record["nll_after"], calibration_path(weights_file))
    return record


def write_calibration(weights_file: Path, temperatures: np.ndarray, fitted_on: dict, nll_before: float,
                      nll_after: float) -> dict:
    """Store the temperatures of `weights_file` beside it (atomic, strict JSON); returns what was written."""
    record = {"zone_names": list(ZONE_NAMES), "temperatures": [float(value) for value in temperatures],
              "fitted_on": fitted_on, "weights_sha256": file_sha256(weights_file),
              "nll_before": float(nll_before), "nll_after": float(nll_after)}
    atomic_write_json(calibration_path(weights_file), record)
    return record


def read_calibration(weights_file: Path) -> dict:
    """The calibration record of `weights_file`, checked; CalibrationError saying what to do when there is none."""
    import json
    path = calibration_path(weights_file)
    refit = "evaluate the val split with these weights to fit it (python -m csi_dist.evaluate --run-dir RUN " \
            "--splits val [--weights ...])"
    if not path.is_file():
        raise CalibrationError(f"--calibrated: no calibration for {weights_file}: {path} does not exist; {refit}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CalibrationError(f"--calibrated: {path} cannot be read as JSON ({error}); {refit}") from None
    missing = [key for key in FILE_KEYS if not isinstance(record, dict) or key not in record]
    if missing:
        raise CalibrationError(f"--calibrated: {path} lacks {', '.join(missing)}; {refit}")
    if record["zone_names"] != list(ZONE_NAMES):
        raise CalibrationError(f"--calibrated: {path}: zone_names {record['zone_names']}, expected {list(ZONE_NAMES)}")
    temperatures = record["temperatures"]
    if (not isinstance(temperatures, list) or len(temperatures) != NUM_ZONES
            or not all(isinstance(value, (int, float)) and math.isfinite(value) and value > 0
                       for value in temperatures)):
        raise CalibrationError(f"--calibrated: {path}: temperatures {temperatures!r}, expected {NUM_ZONES} positive "
                               "numbers")
    try:
        weights_sha256 = file_sha256(weights_file)
    except OSError as error:
        raise CalibrationError(f"--calibrated: cannot read the weights {weights_file}: {error}") from None
    if record["weights_sha256"] != weights_sha256:
        raise CalibrationError(f"--calibrated: {path} was fitted for other weights (sha256 "
                               f"{str(record['weights_sha256'])[:12]}, {weights_file} has {weights_sha256[:12]}); "
                               f"{refit}")
    return record
