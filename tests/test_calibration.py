"""Calibration (evaluation.calibration): ECE against a hand-worked example and a plain loop, Brier and NLL against
scikit-learn, temperature scaling on simulated logits, the calibration file, and evaluate/predict --calibrated."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.domain import CLASS_NAMES, CSV_SEPARATOR, FILE_ID_COLUMN, NUM_CLASSES, ZONE_NAMES
from csi_dist.evaluation.calibration import (CalibrationError, calibration_metrics, calibration_path, classwise_ece,
                                             fit_temperatures, read_calibration, reliability_bins, top_label_ece,
                                             write_calibration, zone_softmax)

PROB_COLUMNS = [f"{zone}_p_{name}" for zone in ZONE_NAMES for name in CLASS_NAMES]


def probs_with_confidences(confidences: list[float], correct: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(M, 5) rows whose largest probability (class 0) is the confidence, the rest shared by the other 4 classes;
    target 0 where correct, else 1."""
    confidences = np.asarray(confidences)
    probs = np.repeat(((1 - confidences) / 4)[:, None], NUM_CLASSES, axis=1)
    probs[:, 0] = confidences
    return probs, np.where(correct, 0, 1)


def test_ece_of_a_hand_worked_example():
    # confidences 0.3 0.4 | 0.5 0.6 | 0.8 0.9, correct   no yes | no yes | yes yes, 3 equal-mass bins:
    # edges at the 1/3 and 2/3 quantiles (linear interpolation over the 6 sorted values): positions 5/3 and 10/3,
    # 0.4 + 2/3 * 0.1 = 0.4667 and 0.6 + 1/3 * 0.2 = 0.6667, so the bins are {0.3, 0.4} {0.5, 0.6} {0.8, 0.9}:
    #   bin 1: mean confidence 0.35, accuracy 1/2, gap 0.15
    #   bin 2: mean confidence 0.55, accuracy 1/2, gap 0.05
    #   bin 3: mean confidence 0.85, accuracy 2/2, gap 0.15
    # ECE = 2/6 * 0.15 + 2/6 * 0.05 + 2/6 * 0.15 = 0.35 / 3 = 0.116667
    probs, targets = probs_with_confidences([0.3, 0.4, 0.5, 0.6, 0.8, 0.9], [False, True, False, True, True, True])
    assert top_label_ece(probs, targets, n_bins=3) == pytest.approx(0.35 / 3, abs=1e-12)
    bins = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == targets, n_bins=3)
    np.testing.assert_allclose(bins.mean_score, [0.35, 0.55, 0.85])
    np.testing.assert_allclose(bins.accuracy, [0.5, 0.5, 1.0])
    assert bins.count.tolist() == [2, 2, 2]
    # a perfectly calibrated bin has no gap: confidence 0.5 right half of the time
    half, half_targets = probs_with_confidences([0.5] * 4, [True, False, True, False])
    assert top_label_ece(half, half_targets, n_bins=3) == pytest.approx(0.0, abs=1e-12)


def loop_ece(scores: np.ndarray, hits: np.ndarray, n_bins: int) -> tuple[float, list[tuple[float, float]]]:
    """ECE with a plain loop: equal-mass bins bounded by the score percentiles, a score on an inner edge in the lower
    bin; returns the ECE and (accuracy, mean score) of each non-empty bin."""
    edges = [float(np.percentile(scores, 100 * b / n_bins)) for b in range(n_bins + 1)]
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for index, score in enumerate(scores):
        members[sum(1 for edge in edges[1:-1] if edge < score)].append(index)
    ece, curve = 0.0, []
    for chosen in members:
        if chosen:
            accuracy = sum(float(hits[i]) for i in chosen) / len(chosen)
            confidence = sum(float(scores[i]) for i in chosen) / len(chosen)
            ece += len(chosen) / len(scores) * abs(accuracy - confidence)
            curve.append((accuracy, confidence))
    return ece, curve


def random_predictions(seed: int, n_images: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(NUM_CLASSES, 0.7), size=(n_images, len(ZONE_NAMES)))
    probs[: n_images // 3] = np.round(probs[: n_images // 3], 2)  # ties: many rows share a confidence
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs, rng.integers(0, NUM_CLASSES, size=(n_images, len(ZONE_NAMES)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_matches_a_plain_loop_and_sklearns_quantile_calibration_curve(seed: int):
    probs, targets = random_predictions(seed)
    metrics = calibration_metrics(probs, targets)
    for prefix, zone_probs, zone_targets in [("", probs.reshape(-1, NUM_CLASSES), targets.ravel()),
                                             *[(f"{name}/", probs[:, zone], targets[:, zone])
                                               for zone, name in enumerate(ZONE_NAMES)]]:
        confidence, hits = zone_probs.max(axis=1), zone_probs.argmax(axis=1) == zone_targets
        expected, curve = loop_ece(confidence, hits, 10)
        assert metrics[f"{prefix}ece"] == pytest.approx(expected, abs=1e-12)
        prob_true, prob_pred = calibration_curve(hits, confidence, n_bins=10, strategy="quantile")
        np.testing.assert_allclose(np.array(curve), np.stack([prob_true, prob_pred], axis=1), atol=1e-12)
        classwise = np.mean([loop_ece(zone_probs[:, klass], zone_targets == klass, 10)[0]
                             for klass in range(NUM_CLASSES)])
        assert metrics[f"{prefix}classwise_ece"] == pytest.approx(classwise, abs=1e-12)
    assert classwise_ece(np.zeros((0, NUM_CLASSES)), np.zeros(0, dtype=int)) != classwise_ece(
        probs[:, 0], targets[:, 0])  # NaN without predictions


def test_brier_and_nll_match_sklearn_pooled_and_per_zone():
    probs, targets = random_predictions(3)
    probs[0, 0] = [1.0, 0.0, 0.0, 0.0, 0.0]  # a certain, wrong prediction: NLL clipped as log_loss clips it
    targets[0, 0] = 2
    metrics = calibration_metrics(probs, targets)
    labels = list(range(NUM_CLASSES))
    for prefix, zone_probs, zone_targets in [("", probs.reshape(-1, NUM_CLASSES), targets.ravel()),
                                             *[(f"{name}/", probs[:, zone], targets[:, zone])
                                               for zone, name in enumerate(ZONE_NAMES)]]:
        assert metrics[f"{prefix}brier"] == pytest.approx(brier_score_loss(zone_targets, zone_probs, labels=labels),
                                                          rel=1e-12)
        assert metrics[f"{prefix}nll"] == pytest.approx(log_loss(zone_targets, zone_probs, labels=labels), rel=1e-12)


def calibrated_generator(seed: int, n_images: int, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """float32 logits and targets drawn from their own softmax: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(0.0, scale, size=(n_images, len(ZONE_NAMES), NUM_CLASSES))).astype(np.float32)
    cumulative = softmax(logits.astype(np.float64), axis=-1).cumsum(axis=-1)
    targets = (rng.random((n_images, len(ZONE_NAMES), 1)) > cumulative).sum(axis=-1)
    return logits, np.minimum(targets, NUM_CLASSES - 1)


@pytest.mark.parametrize("factor", [3.0, 1 / 3])
def test_temperature_scaling_brings_ece_down_on_miscalibrated_logits(factor: float):
    val_logits, val_targets = calibrated_generator(0, 1500)
    test_logits, test_targets = calibrated_generator(1, 1500)
    temperatures = fit_temperatures(val_logits * factor, val_targets)
    np.testing.assert_allclose(temperatures, factor, rtol=0.15)  # undoes the factor
    before = calibration_metrics(zone_softmax(test_logits * factor), test_targets)
    after = calibration_metrics(zone_softmax(test_logits * factor, temperatures), test_targets)
    assert after["ece"] < before["ece"] / 2 and after["nll"] < before["nll"] and after["brier"] < before["brier"]
    for zone in ZONE_NAMES:
        assert after[f"{zone}/ece"] < before[f"{zone}/ece"]


def test_temperature_scaling_never_changes_an_argmax():
    rng = np.random.default_rng(7)
    logits = rng.normal(0.0, 4.0, size=(400, len(ZONE_NAMES), NUM_CLASSES)).astype(np.float32)
    logits[:100] *= 100  # large logits: probabilities of the others underflow
    top = logits[100:200].argmax(axis=-1)[..., None]
    neighbour = np.take_along_axis(logits[100:200], top, axis=-1)  # near ties: the top logit's float32 neighbours
    rolled = np.roll(np.eye(NUM_CLASSES, dtype=bool)[top[..., 0]], 1, axis=-1)
    logits[100:200] = np.where(rolled, np.nextafter(neighbour, np.float32(-np.inf)), logits[100:200])
    logits[200:250, :, 3] = logits[200:250, :, 1] = logits[200:250].max(axis=-1)  # exact ties stay ties
    expected = logits.argmax(axis=-1)
    for temperatures in ([0.05] * 6, [20.0] * 6, [0.05, 0.3, 1.0, 2.5, 7.0, 20.0],
                         fit_temperatures(*calibrated_generator(3, 300))):
        assert (zone_softmax(logits, np.asarray(temperatures)).argmax(axis=-1) == expected).all(), temperatures
    assert (zone_softmax(logits).argmax(axis=-1) == expected).all()


def test_the_calibration_file_is_strict_json_and_refused_for_other_weights(tmp_path: Path):
    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"weights")
    with pytest.raises(CalibrationError, match="no calibration for .*best.calibration.json does not exist"):
        read_calibration(weights)
    written = write_calibration(weights, np.array([1.5, 2.0, 0.5, 1.0, 3.0, 1.25]),
                                {"split": "val", "shard_dir": "s", "manifest_sha256": "m", "n_images": 3},
                                nll_before=1.2, nll_after=math.nan)
    assert calibration_path(weights) == tmp_path / "best.calibration.json"
    stored = json.loads(calibration_path(weights).read_text(), parse_constant=lambda name: pytest.fail(name))
    assert stored["nll_after"] is None and stored["zone_names"] == list(ZONE_NAMES)
    assert read_calibration(weights)["temperatures"] == written["temperatures"]
    weights.write_bytes(b"other weights")
    with pytest.raises(CalibrationError, match="was fitted for other weights"):
        read_calibration(weights)
    calibration_path(weights).write_text("{not json")
    with pytest.raises(CalibrationError, match="best.calibration.json cannot be read as JSON"):
        read_calibration(weights)


def test_temperatures_that_cannot_be_stored_are_used_for_the_evaluation_and_logged(tmp_path: Path, monkeypatch,
                                                                                   caplog):
    import csi_dist.evaluation.calibration as calibration

    def refuse(path, payload):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(calibration, "atomic_write_json", refuse)
    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"weights")
    logits, targets = calibrated_generator(5, 200)
    record = calibration.fit_calibration(weights, logits * 3, targets, {"split": "val"})
    np.testing.assert_allclose(record["temperatures"], 3.0, rtol=0.3)
    assert record["nll_after"] < record["nll_before"] and record["weights_sha256"] is None
    assert "cannot be stored beside" in caplog.text and not calibration_path(weights).exists()


# ---------------------------------------------------------------------------------------------------- commands


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep=CSV_SEPARATOR, dtype={FILE_ID_COLUMN: str}).set_index(FILE_ID_COLUMN)


@pytest.mark.slow
def test_evaluate_fits_on_val_and_calibrated_outputs_say_so(trained_run: Path, phantom_shards: Path, tmp_path: Path):
    run_dir = trained_run
    raw = run("-m", "csi_dist.evaluate", "--run-dir", str(run_dir), "--splits", "test", "val", "--out",
              str(tmp_path / "raw"))
    assert raw.returncode == 0, raw.stderr[-4000:]
    weights = max((run_dir / "weights").glob("*.safetensors"), key=lambda path: path.name == "best.safetensors")
    record = json.loads(calibration_path(weights).read_text())
    assert set(record) == {"zone_names", "temperatures", "fitted_on", "weights_sha256", "nll_before", "nll_after"}
    assert record["fitted_on"]["split"] == "val" and record["nll_after"] <= record["nll_before"]
    provenance = json.loads((tmp_path / "raw" / "provenance.json").read_text())["evaluated"]
    assert provenance["probabilities"] == "raw"
    assert provenance["calibration"]["temperatures"] == record["temperatures"]
    for split in ("val", "test"):
        metrics = json.loads((tmp_path / "raw" / f"{split}_metrics.json").read_text())
        assert metrics["probabilities"] == "raw" and {"ece", "calibrated/ece", "temperature/left_inf"} <= set(metrics)
        # the calibration metrics of the probabilities used carry their bootstrap interval, as every other metric
        calibration_keys = {f"{prefix}{key}" for prefix in ("", *(f"{zone}/" for zone in ZONE_NAMES))
                            for key in ("ece", "classwise_ece", "brier", "nll")}
        assert calibration_keys <= set(metrics["intervals"])
        assert all(0 <= low < high for low, high in (metrics["intervals"][key] for key in ("ece", "brier", "nll")))
        table = pd.read_csv(tmp_path / "raw" / f"{split}_metrics.csv", sep=CSV_SEPARATOR).set_index("metric")
        assert table.loc[sorted(calibration_keys), ["ci_low", "ci_high"]].notna().all().all()
        report = (tmp_path / "raw" / f"{split}_report.md").read_text()
        assert "**raw probabilities" in report and "## Calibration" in report
        low, high = metrics["intervals"]["nll"]
        assert f" {metrics['nll']:.3f} ({low:.3f}-{high:.3f}) |" in report.split("## Calibration")[1]
        for kind in ("raw", "calibrated"):
            assert f"]({split}_reliability_{kind}.png)" in report
            assert (tmp_path / "raw" / f"{split}_reliability_{kind}_zones.png").is_file()
    assert "in-sample" in (tmp_path / "raw" / "val_report.md").read_text()
    assert set(read_csv(tmp_path / "raw" / "test_predictions.csv")["probabilities"]) == {"raw"}

    scaled = run("-m", "csi_dist.evaluate", "--run-dir", str(run_dir), "--splits", "test", "--calibrated", "--out",
                 str(tmp_path / "calibrated"))
    assert scaled.returncode == 0, scaled.stderr[-4000:]
    before = read_csv(tmp_path / "raw" / "test_predictions.csv")
    after = read_csv(tmp_path / "calibrated" / "test_predictions.csv")
    assert set(after["probabilities"]) == {"calibrated"}
    expected = softmax(np.log(before[PROB_COLUMNS].to_numpy().reshape(-1, 6, 5))
                       / np.asarray(record["temperatures"])[None, :, None], axis=-1)
    # the CSVs hold 6 significant digits (domain.CSV_FLOAT_FORMAT)
    np.testing.assert_allclose(after[PROB_COLUMNS].to_numpy().reshape(-1, 6, 5), expected, atol=1e-4)
    pred_columns = [f"{zone}_pred" for zone in ZONE_NAMES]
    assert (after[pred_columns] == before[pred_columns]).all().all()  # the same predicted classes
    assert json.loads((tmp_path / "calibrated" / "test_metrics.json").read_text())["probabilities"] == "calibrated"
    assert "**calibrated probabilities" in (tmp_path / "calibrated" / "test_report.md").read_text()
    assert json.loads((tmp_path / "calibrated" / "provenance.json").read_text())["evaluated"]["probabilities"] \
        == "calibrated"

    images = tmp_path / "images"
    images.mkdir()
    for file_id in list(after.index)[:2]:
        shutil.copy(phantom_shards / "raw" / "images" / f"{file_id}.png", images / f"{file_id}.png")
    predicted = run("-m", "csi_dist.predict", "--run-dir", str(run_dir), "--images", str(images), "--calibrated",
                    "--out", str(tmp_path / "predicted.csv"))
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    new = read_csv(tmp_path / "predicted.csv")
    assert set(new["probabilities"]) == {"calibrated"} and "calibrated" in predicted.stderr
    np.testing.assert_allclose(new[PROB_COLUMNS].to_numpy(), after.loc[new.index, PROB_COLUMNS].to_numpy(),
                               atol=1e-5, rtol=0)


def test_calibrated_without_a_calibration_of_the_weights_exits_2_saying_how_to_fit_one(trained_run: Path,
                                                                                       phantom_shards: Path,
                                                                                       tmp_path: Path, caplog):
    """In this process (the commands' main): the calibration is checked before any model or process group."""
    from csi_dist.evaluate import main as evaluate_main
    from csi_dist.predict import main as predict_main
    weights = max((trained_run / "weights").glob("*.safetensors"), key=lambda path: path.name == "best.safetensors")
    copied = tmp_path / "copied.safetensors"  # beside it no calibration, whatever the other tests fitted
    shutil.copy(weights, copied)
    (tmp_path / "images").mkdir()
    shutil.copy(next((phantom_shards / "raw" / "images").glob("*.png")), tmp_path / "images")
    out = tmp_path / "out"
    for main, command in ((evaluate_main, ["--splits", "test", "--out", str(out)]),
                          (predict_main, ["--images", str(tmp_path / "images"), "--out", str(out / "p.csv")])):
        caplog.clear()
        assert main(["--run-dir", str(trained_run), *command, "--weights", str(copied), "--calibrated"]) == 2
        assert f"no calibration for {copied}" in caplog.text and "--splits val" in caplog.text, caplog.text
    write_calibration(copied, np.ones(6), {"split": "val"}, 1.0, 1.0)
    copied.write_bytes(copied.read_bytes() + b" ")  # other weights now
    caplog.clear()
    assert evaluate_main(["--run-dir", str(trained_run), "--splits", "test", "--weights", str(copied), "--calibrated",
                          "--out", str(out)]) == 2
    assert "was fitted for other weights" in caplog.text, caplog.text
    assert not out.exists()
