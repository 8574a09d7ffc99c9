"""`python -m csi_dist.compare`: the paired bootstrap difference of two runs' headline metrics on one split."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.domain import CSV_SEPARATOR, FILE_ID_COLUMN, NUM_CLASSES, NUM_ZONES
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.evaluation.report import write_evaluation

N_IMAGES = 150


def run_compare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csi_dist.compare", *args], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def predictions(rng: np.random.Generator, targets: np.ndarray, accuracy: float) -> np.ndarray:
    """Probabilities whose argmax is the target with probability `accuracy` per zone, else another grade."""
    right = rng.random(targets.shape) < accuracy
    guess = np.where(right, targets, (targets + rng.integers(1, 4, size=targets.shape)) % 4)
    logits = rng.normal(0, 0.3, size=(*targets.shape, NUM_CLASSES))
    np.put_along_axis(logits, guess[..., None], 3.0, axis=-1)
    return np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Run A right on 55 % of the zones, run B on 80 %, on the same 150 images of 75 patients."""
    rng = np.random.default_rng(12)
    targets = rng.integers(0, 4, size=(N_IMAGES, NUM_ZONES))
    csi = targets.mean(axis=1)
    ahf = (csi + rng.normal(0, 0.1, N_IMAGES) > 1.5).astype(float)
    file_ids = [f"{30_000_000 + image}" for image in range(N_IMAGES)]
    patients = [f"P{image // 2}" for image in range(N_IMAGES)]
    runs = {}
    for name, accuracy in (("a", 0.55), ("b", 0.8)):
        probs = predictions(rng, targets, accuracy)
        run_dir = tmp_path_factory.mktemp(name)
        write_evaluation(run_dir / "evaluation", "test", file_ids, probs, targets, csi, ahf, patient_ids=patients)
        runs[name] = (run_dir, compute_metrics(probs, targets, csi, ahf))
    return runs


def test_a_run_better_by_construction_wins_every_headline_metric_with_p_below_005(two_runs, tmp_path: Path):
    (run_a, metrics_a), (run_b, metrics_b) = two_runs["a"], two_runs["b"]
    result = run_compare(str(run_a), str(run_b), "--split", "test", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "comparison_test.csv", sep=CSV_SEPARATOR).set_index("metric")
    assert list(table.index) == ["f1_weighted", "f1_macro", "csi_mae", "csi_pearson_r", "ahf_accuracy", "ahf_auroc"]
    for key, row in table.iterrows():
        # the differences are those of scikit-learn's metrics (compute_metrics) of the two runs
        assert row["difference"] == pytest.approx(metrics_b[key] - metrics_a[key], rel=1e-5), key
        assert row["p_value"] < 0.05, key
        assert row["better"] == "B", key
        assert not row["ci_low"] <= 0 <= row["ci_high"], key
        assert row["ci_low"] <= row["difference"] <= row["ci_high"], key
    assert table.loc["csi_mae", "difference"] < 0  # lower is better
    assert "| f1_weighted |" in result.stdout and "of patients" in result.stdout
    assert "75 patients" in (tmp_path / "comparison_test.md").read_text()
    assert (tmp_path / "comparison_test.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_compared_with_itself_differs_by_exactly_zero(two_runs, tmp_path: Path):
    run_a = two_runs["a"][0]
    result = run_compare(str(run_a), str(run_a / "evaluation"), "--resamples", "200", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "comparison_test.csv", sep=CSV_SEPARATOR)
    assert (table[["difference", "ci_low", "ci_high"]].to_numpy() == 0).all()
    assert (table["p_value"] == 1).all() and (table["better"] == "neither").all()


def test_runs_on_other_images_or_targets_are_refused_with_exit_2(two_runs, tmp_path: Path):
    run_a, run_b = two_runs["a"][0], two_runs["b"][0]
    table = pd.read_csv(run_b / "evaluation" / "test_predictions.csv", sep=CSV_SEPARATOR, dtype={FILE_ID_COLUMN: str})
    other_images = table.copy()
    other_images.loc[0, FILE_ID_COLUMN] = "99999999"
    other_images.to_csv(tmp_path / "other_images.csv", sep=CSV_SEPARATOR, index=False)
    other_targets = table.copy()
    other_targets.loc[3, "left_mid_true"] = (other_targets.loc[3, "left_mid_true"] + 1) % 4
    other_targets.to_csv(tmp_path / "other_targets.csv", sep=CSV_SEPARATOR, index=False)
    shuffled = table.sample(frac=1.0, random_state=0)  # another order is the same images: accepted
    shuffled.to_csv(tmp_path / "shuffled.csv", sep=CSV_SEPARATOR, index=False)
    changed = table.loc[3, FILE_ID_COLUMN]
    for csv, message in (("other_images.csv", "do not hold the same images: 1 FileID(s) only in the first"),
                         ("other_targets.csv", f"different targets for 1 image(s), e.g. FileID {changed}"),
                         ("missing.csv", "no test_predictions.csv")):
        result = run_compare(str(run_a), str(tmp_path / csv), "--out", str(tmp_path / "out"))
        assert result.returncode == 2, (csv, result.stderr)
        assert message in result.stderr, (csv, result.stderr)
        assert "Traceback" not in result.stderr
    assert run_compare(str(run_b), str(tmp_path / "shuffled.csv"), "--resamples", "50",
                       "--out", str(tmp_path / "out")).returncode == 0


def test_runs_the_data_cannot_tell_apart_are_neither_better():
    """Two equally good runs differ by chance: where the interval of the difference holds 0 neither run is called
    better (a table reading "better: A" at p = 0.7 would be read as a finding)."""
    from csi_dist.evaluation.comparison import RunPredictions, compare_predictions
    rng = np.random.default_rng(5)
    targets = rng.integers(0, 4, size=(N_IMAGES, NUM_ZONES))
    file_ids = [f"{image}" for image in range(N_IMAGES)]
    run_a, run_b = (RunPredictions(Path(name), file_ids, predictions(rng, targets, 0.7), targets, None, None, None)
                    for name in ("a", "b"))
    rows, _ = compare_predictions(run_a, run_b, n_resamples=300)
    undecided = [row for row in rows if row["ci_low"] <= 0 <= row["ci_high"]]
    assert any(row["difference"] != 0 for row in undecided)  # estimates that differ, by chance
    assert all(row["better"] == "neither" for row in undecided)
    assert all(row["better"] in "AB" for row in rows if row not in undecided)
