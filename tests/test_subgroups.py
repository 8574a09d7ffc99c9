"""Subgroups: metrics per value of a metadata column with intervals; a worse subgroup is flagged, a tiny one named."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, mean_absolute_error

from csi_dist.domain import UNKNOWN_CLASS
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.evaluation.subgroups import SubgroupError, check_columns, write_subgroups


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
    results = write_subgroups(tmp_path, "test", split, ["site", "sex"], overall, n_resamples=300)
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
