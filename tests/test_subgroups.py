"""Subgroups: metrics per value of a metadata column with intervals; a worse subgroup is flagged, a tiny one named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, mean_absolute_error

from conftest import REPO_ROOT, subprocess_env, torchrun_command
from csi_dist.core.domain import CLASS_NAMES, ZONE_NAMES
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.evaluation.subgroups import SubgroupError, SubgroupOptions, check_columns, write_subgroups


def simulated_split(seed: int = 0) -> SimpleNamespace:
    """Site A (160 images) predicted right 85 % of the time per zone, site B (160) 35 %, site C 6 images; sex
    unrelated to quality; two images per patient."""
    rng = np.random.default_rng(seed)
    sites = ["A"] * 160 + ["B"] * 160 + ["C"] * 6
    n = len(sites)
    targets = rng.integers(0, 4, (n, 6))
    hit_rate = np.array([{"A": 0.85, "B": 0.35, "C": 0.85}[site] for site in sites])[:, None]
    predicted = np.where(rng.random((n, 6)) < hit_rate, targets, rng.integers(0, 4, (n, 6)))
    probs = np.full((n, 6, 5), 0.05)
    np.put_along_axis(probs, predicted[..., None], 0.8, axis=-1)
    return SimpleNamespace(zone_probs=probs, zone_targets=targets, csi_truth=None, ahf_truth=None,
                           patient_ids=[f"P{index // 2}" for index in range(n)],
                           metadata={"site": sites, "sex": [["F", "M", None][index % 3] for index in range(n)]})


def test_a_site_made_worse_is_flagged_and_a_tiny_site_is_named(tmp_path: Path):
    split = simulated_split()
    (tmp_path / "test_report.md").write_text("# Evaluation of split `test`\n")
    overall = compute_metrics(split.zone_probs, split.zone_targets)
    results = write_subgroups(tmp_path, "test", split, overall, SubgroupOptions(("site", "sex"), n_resamples=300))
    by_name = {(group.column, group.value): group for group in results}
    assert list(by_name) == [("site", "A"), ("site", "B"), ("site", "C"), ("sex", "F"), ("sex", "M"),
                             ("sex", "(missing)")]
    sites = np.array(split.metadata["site"])
    worse = sites == "B"
    # the estimates are the metrics of the subgroup's images alone (scikit-learn on B's graded zones)
    predicted = split.zone_probs.argmax(-1)
    assert by_name["site", "B"].metrics["accuracy"] == pytest.approx(
        accuracy_score(split.zone_targets[worse].ravel(), predicted[worse].ravel()))
    assert by_name["site", "B"].metrics["csi_mae"] == pytest.approx(
        mean_absolute_error(split.zone_targets[worse].mean(1), predicted[worse].mean(1)))
    assert {"f1_weighted", "accuracy", "csi_mae"} <= set(by_name["site", "B"].flags)  # csi_mae: interval above
    assert not {"f1_weighted", "accuracy", "csi_mae"} & set(by_name["site", "A"].flags)
    assert not by_name["site", "C"].estimated
    assert by_name["site", "A"].n_patients == 80 and by_name["site", "C"].n_patients == 3

    table = pd.read_csv(tmp_path / "test_subgroups.csv", sep=";", keep_default_na=False)
    flagged_b = table[(table["value"] == "B") & (table["metric"] == "f1_weighted")].iloc[0]
    assert str(flagged_b["flag"]) == "1" and float(flagged_b["ci_high"]) < float(flagged_b["overall"])
    tiny = table[table["value"] == "C"]
    assert len(tiny) == 1 and tiny.iloc[0]["status"] == "too small to estimate" and tiny.iloc[0]["n_images"] == 6

    report = (tmp_path / "test_report.md").read_text()
    assert "## Subgroups" in report and "### site" in report and "### sex" in report
    line_b = next(line for line in report.splitlines() if line.startswith("| B |"))
    assert "**FLAG**" in line_b and "csi_mae" in line_b
    line_a = next(line for line in report.splitlines() if line.startswith("| A |"))
    assert "FLAG" not in line_a
    assert "| C | 6 | 3 | too small to estimate (6 images, 3 patients)" in report


def test_an_unknown_column_is_named_with_the_columns_there_are():
    with pytest.raises(SubgroupError, match=r"--by scanner: no such metadata column .*its columns: site, sex"):
        check_columns(["site", "scanner"], ["site", "sex"], "shards/manifest.json")


def run_evaluate(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    prefix = (torchrun_command(processes, "-m", "csi_dist.evaluate") if processes > 1
              else [sys.executable, "-m", "csi_dist.evaluate"])
    return subprocess.run([*prefix, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=subprocess_env())


@pytest.fixture(scope="module")
def site_shards(phantom_shards: Path, tmp_path_factory) -> Path:
    """The phantom's images and split again, its label CSV given a "site" column (by patient) and a "scanner"
    column with empty cells: the trained run's own test images, with metadata."""
    root = tmp_path_factory.mktemp("sites")
    labels = pd.read_csv(phantom_shards / "raw" / "labels.csv", sep=";", dtype=str, keep_default_na=False)
    patient_number = labels["patient_id"].str[1:].astype(int)
    labels["site"] = np.where(patient_number % 3 == 0, "north", "south")
    labels["scanner"] = np.where(patient_number % 4 == 0, "", "X1")
    labels.to_csv(root / "labels.csv", sep=";", index=False)
    from csi_dist.data.shards.writer import write_shards
    write_shards(root / "labels.csv", phantom_shards / "raw" / "images", root / "shards", image_size=32, workers=1,
                 split_file=phantom_shards / "split.csv")
    return root


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_by_site_on_two_processes_gives_each_sites_own_metrics_and_names_small_ones(site_shards,
                                                                                             trained_run, tmp_path):
    options = ["--run-dir", str(trained_run), "--splits", "test", "--shard-dir", str(site_shards / "shards"),
               "--by", "site", "--by", "scanner", "--min-subgroup-images", "8", "--min-subgroup-patients", "6"]
    result = run_evaluate(*options, "--out", str(tmp_path / "two"), processes=2)
    assert result.returncode == 0, result.stderr[-3000:]

    labels = pd.read_csv(site_shards / "labels.csv", sep=";", dtype=str, keep_default_na=False)
    # the fixture's own evaluation, on one process, of the same test images: per-image probabilities by FileID
    predictions = pd.read_csv(trained_run / "evaluation" / "test_predictions.csv", sep=";", dtype={"FileID": str})
    test = labels.set_index("FileID").loc[predictions["FileID"]].reset_index()
    probs = np.stack([predictions[[f"{zone}_p_{name}" for name in CLASS_NAMES]].to_numpy() for zone in ZONE_NAMES],
                     axis=1)
    targets = predictions[[f"{zone}_true" for zone in ZONE_NAMES]].to_numpy()
    table = pd.read_csv(tmp_path / "two" / "test_subgroups.csv", sep=";", dtype=str, keep_default_na=False)
    report = (tmp_path / "two" / "test_report.md").read_text()
    for column in ("site", "scanner"):
        for value, images in test.groupby(column):
            name, rows = value or "(missing)", images.index.to_numpy()
            group = table[(table["column"] == column) & (table["value"] == name)]
            n_images, n_patients = len(images), images["patient_id"].nunique()
            assert group["n_images"].iloc[0] == str(n_images) and group["n_patients"].iloc[0] == str(n_patients)
            if n_images >= 8 and n_patients >= 6:
                estimate = dict(zip(group["metric"], pd.to_numeric(group["estimate"], errors="coerce")))
                expected = compute_metrics(probs[rows], targets[rows])
                for key in ("f1_weighted", "accuracy", "csi_mae"):
                    assert estimate[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (column, name, key)
            else:
                assert group["status"].tolist() == ["too small to estimate"]
                assert f"| {name} | {n_images} | {n_patients} | too small to estimate" in report
    assert set(table["status"]) == {"estimated", "too small to estimate"}
    assert "## Subgroups" in report and "### site" in report and "### scanner" in report
    # other shards to evaluate, so a dataset-shift summary: of the run's own test images, it finds no shift
    shift = json.loads((tmp_path / "two" / "test_dataset_shift.json").read_text())
    assert shift["warning"] is None and not [item for item in shift["comparisons"] if item["strong"]]
    assert "No strong difference from the training data" in (tmp_path / "two" / "test_dataset_shift.md").read_text()


@pytest.mark.slow
def test_evaluate_by_an_unknown_column_exits_2_naming_it_and_the_columns_there_are(site_shards, trained_run):
    result = run_evaluate("--run-dir", str(trained_run), "--shard-dir", str(site_shards / "shards"), "--by", "sex")
    assert result.returncode == 2
    assert "--by sex: no such metadata column" in result.stderr and "its columns: site, scanner" in result.stderr
    assert "Traceback" not in result.stderr
