"""Bootstrap intervals: the resampled metrics are compute_metrics' (scikit-learn) on the resampled images, the
percentile interval covers a known truth 95 % of the time, with and without patient clustering, and agrees with
scipy.stats.bootstrap."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import bootstrap as scipy_bootstrap

from csi_dist.core.domain import NUM_CLASSES, NUM_ZONES, UNKNOWN_CLASS
from csi_dist.evaluation.intervals import (SufficientStatistics, bootstrap, bootstrap_intervals, group_codes,
                                           is_count_key, resample_weights)
from csi_dist.evaluation.metrics import compute_metrics

TRUE_ACCURACY = 0.7
COVERAGE_DATASETS = 400
COVERAGE_RESAMPLES = 500


def probs_for(predictions: np.ndarray) -> np.ndarray:
    probs = np.full((*predictions.shape, NUM_CLASSES), 0.05)
    np.put_along_axis(probs, predictions[..., None], 0.8, axis=-1)
    return probs


def random_dataset(rng: np.random.Generator, n_images: int):
    """Random probabilities, targets with unknowns (some images and one zone wholly unknown), and CSV csi / ahf with
    NaNs: every kind of undefined case compute_metrics knows."""
    logits = rng.normal(size=(n_images, NUM_ZONES, NUM_CLASSES))
    logits[rng.random(n_images) < 0.1, :, UNKNOWN_CLASS] += 9  # images predicted all unknown
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    targets = rng.choice(NUM_CLASSES, size=(n_images, NUM_ZONES), p=[0.4, 0.25, 0.12, 0.08, 0.15])
    targets[rng.random(n_images) < 0.1] = UNKNOWN_CLASS
    targets[:, 5] = UNKNOWN_CLASS if rng.random() < 0.5 else targets[:, 5]
    csi = np.where(rng.random(n_images) < 0.2, np.nan, rng.normal(1.5, 0.7, n_images))
    ahf = np.where(rng.random(n_images) < 0.2, np.nan, (rng.random(n_images) < 0.4).astype(float))
    return probs, targets, csi, ahf


def assert_same_metrics(expected: dict, resampled: dict, row: int, where: str) -> None:
    keys = {key for key in expected if not is_count_key(key)}
    assert keys == set(resampled), where
    for key in keys:
        value = resampled[key][row]
        if math.isnan(expected[key]):
            assert math.isnan(value), f"{where}: {key} should be undefined, got {value}"
        else:
            assert value == pytest.approx(expected[key], abs=1e-12), f"{where}: {key}"


def test_resampled_metrics_are_compute_metrics_of_the_resampled_images():
    """Each resample's metrics equal scikit-learn's compute_metrics on the images repeated as often as drawn, for
    every key, on data with unknown targets, all-unknown predictions, missing csi/ahf, tiny and degenerate sets."""
    rng = np.random.default_rng(3)
    for trial in range(15):
        n_images = int(rng.integers(1, 30))
        probs, targets, csi, ahf = random_dataset(rng, n_images)
        if trial % 3 == 0:  # few distinct scores: AUROC ties between positives and negatives
            probs = probs_for(rng.integers(0, NUM_CLASSES, size=(n_images, NUM_ZONES)))
        weights = rng.integers(0, 3, size=(6, n_images)).astype(float)
        weights[0] = 1  # the point estimate itself
        weights[1] = 0
        weights[1, 0] = 2  # one image drawn twice: constant CSI, one class
        resampled = SufficientStatistics(probs, targets, csi, ahf).metrics(weights)
        for row, counts in enumerate(weights.astype(int)):
            drawn = np.repeat(np.arange(n_images), counts)
            expected = compute_metrics(probs[drawn], targets[drawn], csi[drawn], ahf[drawn])
            assert_same_metrics(expected, resampled, row, f"trial {trial}, resample {row}")
    probs, targets, _, _ = random_dataset(rng, 12)  # without the CSV columns: their keys are absent
    assert_same_metrics(compute_metrics(probs, targets), SufficientStatistics(probs, targets).metrics(
        np.ones((1, 12))), 0, "no csi/ahf")


def test_resampled_calibration_metrics_are_calibration_metrics_of_the_resampled_images():
    """ECE (equal-mass bins at the percentiles of the repeated scores), classwise ECE, Brier and NLL, pooled and per
    zone, under integer weights equal calibration_metrics (checked against scikit-learn in test_calibration.py) on
    the images repeated as often as drawn: weights 0, ties in the scores (rounded logits), tiny sets."""
    from csi_dist.evaluation.calibration import calibration_metrics
    from csi_dist.evaluation.calibration_intervals import CalibrationStatistics
    rng = np.random.default_rng(8)
    for trial in range(40):
        n_images = int(rng.integers(1, 40))
        logits = rng.normal(size=(n_images, NUM_ZONES, NUM_CLASSES)) * rng.uniform(0.3, 4)
        if trial % 2:
            logits = np.round(logits)  # few distinct probabilities: ties on and around the bin edges
        probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
        targets = rng.choice(NUM_CLASSES, size=(n_images, NUM_ZONES), p=[0.4, 0.25, 0.12, 0.08, 0.15])
        weights = rng.integers(0, 4, size=(6, n_images)).astype(float)
        weights[0] = 1  # the point estimate itself
        weights[1] = 0
        weights[1, -1] = 3  # one image drawn three times (a row may draw none: all NaN)
        resampled = CalibrationStatistics(probs, targets).metrics(weights)
        for row, counts in enumerate(weights.astype(int)):
            drawn = np.repeat(np.arange(n_images), counts)
            expected = calibration_metrics(probs[drawn], targets[drawn])
            assert list(resampled) == list(expected)
            for key, value in expected.items():
                assert resampled[key][row] == pytest.approx(value, rel=1e-12, abs=1e-12, nan_ok=True), \
                    f"trial {trial}, resample {row}: {key}"


def test_the_bootstrap_of_a_split_gives_the_calibration_metrics_intervals_from_the_same_resamples(tmp_path):
    """bootstrap(calibration=True): an interval for every calibration key, the other keys' intervals unchanged (the
    same resamples); written to the JSON, the CSV and the calibration section of the report as "0.081 (0.052-0.113)"
    for the probabilities used."""
    import json

    import pandas as pd

    from csi_dist.core.domain import CSV_SEPARATOR, ZONE_NAMES
    from csi_dist.evaluation.calibration import calibration_metrics
    from csi_dist.evaluation.calibration_report import calibrate_split
    from csi_dist.evaluation.report import write_evaluation
    rng = np.random.default_rng(22)
    probs, targets, csi, ahf = random_dataset(rng, 40)
    patients = [f"P{image // 2}" for image in range(40)]
    plain = bootstrap(probs, targets, csi, ahf, groups=patients, n_resamples=200, seed=3)
    result = bootstrap(probs, targets, csi, ahf, groups=patients, n_resamples=200, seed=3, calibration=True,
                       keep_distributions=True)
    calibration_keys = set(calibration_metrics(probs, targets))
    assert {"ece", "classwise_ece", "brier", "nll", f"{ZONE_NAMES[0]}/ece"} <= calibration_keys
    assert set(result.intervals) == set(plain.intervals) | calibration_keys
    assert {key: result.intervals[key] for key in plain.intervals} == plain.intervals
    # resample 0 is calibration_metrics of the patients it drew (the same draw as resample_weights')
    weights = next(resample_weights(*group_codes(patients, 40), 200, 3))[0].astype(int)
    drawn = np.repeat(np.arange(40), weights)
    assert result.distributions["nll"][0] == pytest.approx(calibration_metrics(probs[drawn], targets[drawn])["nll"])
    low, high = result.intervals["ece"]
    assert 0 <= low < high

    logits = np.log(probs)
    scaled = calibrate_split(tmp_path, "test", logits, targets, None, use_calibrated=False)
    metrics = dict(compute_metrics(probs, targets, csi, ahf), **scaled.metrics)
    paths = write_evaluation(tmp_path, "test", [f"{i:04d}" for i in range(40)], probs, targets, csi, ahf, metrics,
                             bootstrap=result, patient_ids=patients)
    scaled.append_to_report(paths["report"], result.intervals)
    stored = json.loads(paths["metrics"].read_text())
    assert stored["intervals"]["ece"] == pytest.approx([low, high])
    assert stored["intervals"][f"{ZONE_NAMES[2]}/brier"] == pytest.approx(list(result.intervals[
        f"{ZONE_NAMES[2]}/brier"]))
    table = pd.read_csv(paths["metrics_csv"], sep=CSV_SEPARATOR).set_index("metric")
    assert table.loc["nll", "ci_high"] == pytest.approx(result.intervals["nll"][1], rel=1e-5)
    report = paths["report"].read_text()
    assert f"| {metrics['ece']:.3f} ({low:.3f}-{high:.3f}) |" in report.split("## Calibration")[1]
    zone = ZONE_NAMES[4]
    zone_low, zone_high = result.intervals[f"{zone}/classwise_ece"]
    assert f" {metrics[f'{zone}/classwise_ece']:.3f} ({zone_low:.3f}-{zone_high:.3f}) |" in report


def simulated_accuracy_split(rng: np.random.Generator, n_patients: int, images_per_patient: int,
                             concentration: float | None):
    """Zones graded uniformly, each predicted right with the patient's probability (TRUE_ACCURACY for every patient
    when concentration is None; else Beta-distributed with mean TRUE_ACCURACY, so a patient's images are correlated),
    else a uniformly chosen other class (unknown included). The pooled accuracy's true value is TRUE_ACCURACY."""
    n_images = n_patients * images_per_patient
    if concentration is None:
        patient_accuracy = np.full(n_patients, TRUE_ACCURACY)
    else:
        patient_accuracy = rng.beta(TRUE_ACCURACY * concentration, (1 - TRUE_ACCURACY) * concentration, n_patients)
    right = rng.random((n_images, NUM_ZONES)) < np.repeat(patient_accuracy, images_per_patient)[:, None]
    targets = rng.integers(0, UNKNOWN_CLASS, size=(n_images, NUM_ZONES))
    wrong = (targets + rng.integers(1, NUM_CLASSES, size=targets.shape)) % NUM_CLASSES
    predictions = np.where(right, targets, wrong)
    groups = np.repeat([f"P{patient}" for patient in range(n_patients)], images_per_patient)
    return probs_for(predictions), targets, groups


def coverage(intervals: list[tuple[float, float]]) -> float:
    return float(np.mean([low <= TRUE_ACCURACY <= high for low, high in intervals]))


def test_the_95_percent_interval_covers_the_true_accuracy_in_93_to_97_percent_of_400_datasets():
    rng = np.random.default_rng(2026)
    intervals = []
    for dataset in range(COVERAGE_DATASETS):
        probs, targets, _ = simulated_accuracy_split(rng, 60, 1, None)
        intervals.append(bootstrap_intervals(probs, targets, n_resamples=COVERAGE_RESAMPLES, seed=dataset)["accuracy"])
    assert 0.93 <= coverage(intervals) <= 0.97, coverage(intervals)


def test_with_correlated_images_of_a_patient_only_the_patient_bootstrap_covers_and_it_is_wider():
    """40 patients of 3 images whose accuracy varies by patient: resampling images treats 120 correlated images as
    independent and under-covers; resampling patients covers 93-97 % with wider intervals."""
    rng = np.random.default_rng(31)
    by_image, by_patient = [], []
    for dataset in range(COVERAGE_DATASETS):
        probs, targets, groups = simulated_accuracy_split(rng, 40, 3, concentration=6.0)
        by_image.append(bootstrap_intervals(probs, targets, n_resamples=COVERAGE_RESAMPLES, seed=dataset)["accuracy"])
        by_patient.append(bootstrap_intervals(probs, targets, groups=groups, n_resamples=COVERAGE_RESAMPLES,
                                              seed=dataset)["accuracy"])
    assert coverage(by_image) < 0.90, coverage(by_image)
    assert 0.93 <= coverage(by_patient) <= 0.97, coverage(by_patient)
    width = lambda intervals: np.mean([high - low for low, high in intervals])  # noqa: E731
    assert width(by_patient) > 1.3 * width(by_image)


def test_the_percentile_interval_agrees_with_scipy_bootstrap():
    """One graded zone per image: the pooled accuracy is the mean of a 0/1 column, whose percentile interval
    scipy.stats.bootstrap computes from its own resamples (so the two agree up to Monte Carlo error)."""
    rng = np.random.default_rng(5)
    probs, targets, _ = simulated_accuracy_split(rng, 400, 1, None)
    targets[:, 1:] = UNKNOWN_CLASS
    right = (probs.argmax(axis=-1)[:, 0] == targets[:, 0]).astype(float)
    ours = bootstrap_intervals(probs, targets, n_resamples=4000, seed=1)["accuracy"]
    theirs = scipy_bootstrap((right,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                             random_state=np.random.default_rng(2)).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.006)  # SE of an endpoint here ~0.002
    assert ours[0] < right.mean() < ours[1]


def test_intervals_are_seeded_and_cover_every_non_count_key():
    rng = np.random.default_rng(11)
    probs, targets, csi, ahf = random_dataset(rng, 80)
    first = bootstrap_intervals(probs, targets, csi, ahf, n_resamples=200, seed=4)
    assert first == bootstrap_intervals(probs, targets, csi, ahf, n_resamples=200, seed=4)
    assert first != bootstrap_intervals(probs, targets, csi, ahf, n_resamples=200, seed=5)
    metrics = compute_metrics(probs, targets, csi, ahf)
    assert set(first) == {key for key in metrics if not is_count_key(key)}
    for key, (low, high) in first.items():
        if not math.isnan(metrics[key]) and not math.isnan(low):
            assert low <= high, key


def test_a_metric_undefined_in_most_resamples_has_no_interval_and_its_defined_count_is_reported():
    """AUROC needs a positive and a negative: with one of each among 20 images, a resample holds both only ~40 % of
    the time, so no interval; the one-unknown-target recall is defined in ~64 % (1 - (19/20)^20) and keeps one."""
    rng = np.random.default_rng(8)
    probs, targets, _, _ = random_dataset(rng, 20)
    targets[targets == UNKNOWN_CLASS] = 0
    targets[0, 0] = UNKNOWN_CLASS
    ahf = np.full(20, np.nan)
    ahf[:2] = (0.0, 1.0)
    result = bootstrap(probs, targets, ahf_truth=ahf, n_resamples=1000, seed=0)
    assert math.isnan(result.intervals["ahf_auroc"][0]) and math.isnan(result.intervals["ahf_auroc"][1])
    assert result.defined_resamples["ahf_auroc"] == pytest.approx(1000 * (1 - (19 / 20) ** 20) ** 2, abs=60)
    assert result.defined_resamples["unknown_recall"] == pytest.approx(1000 * (1 - (19 / 20) ** 20), abs=50)
    assert not math.isnan(result.intervals["unknown_recall"][0])
    summary = result.summary()
    assert summary["defined_resamples"]["ahf_auroc"] == result.defined_resamples["ahf_auroc"]
    assert "accuracy" not in summary["defined_resamples"]  # defined in every resample


def test_images_without_a_patient_are_their_own_group():
    units, n_units = group_codes(["A", None, "A", "", float("nan"), "B"], 6)
    assert n_units == 5
    assert units[0] == units[2] and len({units[1], units[3], units[4], units[5], units[0]}) == 5
    with pytest.raises(ValueError, match="expected 3 labels"):
        group_codes(["A"], 3)


def test_every_metric_in_the_json_csv_and_report_carries_its_interval(tmp_path):
    """write_evaluation with a bootstrap: the JSON keeps its point estimates and gains an interval per non-count
    key with the settings, the CSV lists estimate and bounds, the report shows "estimate (low-high)"."""
    import json

    import pandas as pd

    from csi_dist.core.domain import CSV_SEPARATOR
    from csi_dist.evaluation.report import write_evaluation
    rng = np.random.default_rng(21)
    probs, targets, csi, ahf = random_dataset(rng, 40)
    patients = [f"P{image // 2}" if image % 5 else None for image in range(40)]
    result = bootstrap(probs, targets, csi, ahf, groups=patients, n_resamples=300, seed=9)
    metrics = compute_metrics(probs, targets, csi, ahf)
    paths = write_evaluation(tmp_path, "test", [f"{i:04d}" for i in range(40)], probs, targets, csi, ahf,
                             bootstrap=result, patient_ids=patients)
    stored = json.loads(paths["metrics"].read_text())
    assert stored["accuracy"] == pytest.approx(metrics["accuracy"])  # point estimates where they were
    assert set(stored["intervals"]) == {key for key in metrics if not is_count_key(key)}
    assert stored["intervals"]["accuracy"] == pytest.approx(list(result.intervals["accuracy"]))
    assert stored["bootstrap"] | {"defined_resamples": None} == {
        "method": "percentile", "level": 0.95, "n_resamples": 300, "seed": 9, "resampled": "patients",
        "clustered_by": "patient_id", "n_resampled_units": 20 + 8, "defined_resamples": None}
    table = pd.read_csv(paths["metrics_csv"], sep=CSV_SEPARATOR).set_index("metric")
    assert list(table.columns) == ["estimate", "ci_low", "ci_high"]
    assert table.loc["csi_mae", "ci_low"] == pytest.approx(result.intervals["csi_mae"][0], rel=1e-5)
    assert math.isnan(table.loc["n_images", "ci_low"])
    report = paths["report"].read_text()
    low, high = result.intervals["f1_weighted"]
    assert f"| f1_weighted | {metrics['f1_weighted']:.3f} ({low:.3f}-{high:.3f}) |" in report
    assert "95% percentile bootstrap interval over 300 resamples of the 28 patients" in report
    predictions = pd.read_csv(paths["predictions"], sep=CSV_SEPARATOR, dtype=str, keep_default_na=False)
    assert predictions["patient_id"].tolist() == [patient or "" for patient in patients]


@pytest.mark.slow
@pytest.mark.distributed
def test_one_and_three_processes_give_identical_intervals(trained_run, tmp_path):
    """The fixture's evaluation ran on 1 process (default 1000 resamples, seed 0); evaluate on 3 ranks gathers the
    predictions and bootstraps once on rank 0: the same intervals, resampling the phantom's patients."""
    import json
    import subprocess

    from conftest import REPO_ROOT, subprocess_env, torchrun_command
    out = tmp_path / "three"
    result = subprocess.run(torchrun_command(3, "-m", "csi_dist.evaluate", "--run-dir", str(trained_run),
                                             "--splits", "test", "--out", str(out)),
                            env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((trained_run / "evaluation" / "test_metrics.json").read_text())
    three = json.loads((out / "test_metrics.json").read_text())
    assert one["bootstrap"] == three["bootstrap"]
    assert one["bootstrap"]["clustered_by"] == "patient_id"
    assert one["bootstrap"]["n_resampled_units"] < one["n_images"]  # some phantom patients have two images
    assert len(one["intervals"]) > 20 and three["intervals"] == one["intervals"]


def test_an_empty_split_has_no_interval_rather_than_an_error():
    empty = bootstrap_intervals(np.zeros((0, NUM_ZONES, NUM_CLASSES)), np.zeros((0, NUM_ZONES), dtype=int),
                                np.zeros(0), np.zeros(0), n_resamples=20)
    assert empty and all(math.isnan(low) and math.isnan(high) for low, high in empty.values())
