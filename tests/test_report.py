"""write_evaluation: the files a user opens after `csi-evaluate`, their content and tiny-dataset robustness."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from csi_dist.core.domain import AHF_COLUMN, CLASS_NAMES, CSI_COLUMN, CSV_SEPARATOR, FILE_ID_COLUMN, ZONE_NAMES
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.evaluation.report import write_evaluation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(11)
    n_images = 40
    probs = rng.dirichlet(np.ones(5), size=(n_images, 6))
    targets = rng.integers(0, 5, size=(n_images, 6))
    targets[0] = 4  # an ungradable image
    csi = rng.uniform(0, 3, size=n_images)
    ahf = (rng.random(n_images) < 0.5).astype(float)
    ahf[1] = np.nan
    # leading zeros must survive: FileIDs are strings, never numbers
    file_ids = [f"{index:08d}" for index in range(n_images)]
    out_dir = tmp_path_factory.mktemp("eval")
    paths = write_evaluation(out_dir, "test", file_ids, probs, targets, csi_truth=csi, ahf_truth=ahf)
    return out_dir, paths, file_ids, probs, targets, csi, ahf


def test_all_files_exist_with_expected_names(written):
    out_dir, paths, *_ = written
    expected = {"test_predictions.csv", "test_metrics.json", "test_metrics.csv", "test_roc.png", "test_pr.png",
                "test_ahf.csv", "test_ahf.md", "test_report.md"} | {f"test_confusion_{name}.png" for name in (*ZONE_NAMES, "pooled")}
    assert {path.name for path in paths.values()} == expected
    assert {path.name for path in out_dir.iterdir()} == expected
    for path in paths.values():
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC


def test_predictions_csv_round_trips(written):
    _, paths, file_ids, probs, targets, csi, ahf = written
    table = pd.read_csv(paths["predictions"], sep=CSV_SEPARATOR, dtype={FILE_ID_COLUMN: str})
    assert table[FILE_ID_COLUMN].tolist() == file_ids
    for zone, name in enumerate(ZONE_NAMES):
        np.testing.assert_array_equal(table[f"{name}_true"], targets[:, zone])
        np.testing.assert_array_equal(table[f"{name}_pred"], probs[:, zone].argmax(axis=-1))
        zone_probs = table[[f"{name}_p_{class_name}" for class_name in CLASS_NAMES]].to_numpy()
        # six significant digits (domain.CSV_FLOAT_FORMAT): within half a unit of the sixth digit of the truth
        np.testing.assert_allclose(zone_probs, probs[:, zone], rtol=5e-6, atol=0)
        np.testing.assert_array_equal(zone_probs.argmax(axis=1), table[f"{name}_pred"])
    assert math.isnan(table["csi_avg_true"][0]) and table["ahf_class_true"][0] == -1
    graded = targets[5] != 4
    assert table["csi_avg_true"][5] == pytest.approx(targets[5][graded].mean())
    np.testing.assert_allclose(table[CSI_COLUMN], csi, rtol=5e-6, atol=0)
    np.testing.assert_array_equal(table[AHF_COLUMN], ahf)


def test_predictions_csv_writes_six_significant_digits(written):
    """A probability is written 0.123457, not 0.12345678901234568 (the 17 digits of a float64 help no reader)."""
    _, paths, *_ = written
    body = paths["predictions"].read_text().splitlines()[1:]
    numbers = [cell for line in body for cell in line.split(CSV_SEPARATOR)[1:] if cell and cell != "nan"]
    digits = [len(cell.split("e")[0].replace("-", "").replace(".", "").lstrip("0")) for cell in numbers]
    assert numbers and max(digits) <= 6, [cell for cell, count in zip(numbers, digits) if count > 6][:5]


def test_metrics_json_is_strict_json_equal_to_compute_metrics(written):
    _, paths, _, probs, targets, csi, ahf = written
    stored = json.loads(paths["metrics"].read_text(), parse_constant=lambda name: pytest.fail(f"bare {name}"))
    expected = compute_metrics(probs, targets, csi, ahf)
    assert stored.pop("probabilities") == "raw"  # which probabilities the metrics are of (evaluate --calibrated)
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert stored[key] is None if math.isnan(value) else stored[key] == pytest.approx(value), key


def test_ahf_table_counts_images_with_defined_averages(written):
    _, paths, *_ = written
    table = pd.read_csv(paths["ahf_csv"], sep=CSV_SEPARATOR)
    assert table["true_class"].tolist() == ["low", "medium", "high"]
    counts = table[["pred_low", "pred_medium", "pred_high"]].to_numpy()
    metrics = json.loads(paths["metrics"].read_text())
    assert counts.sum() == metrics["csi_n_images"]
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["ahf_accuracy"])
    np.testing.assert_array_equal(table["support"], counts.sum(axis=1))
    assert "| true \\ predicted | low | medium | high |" in paths["ahf_md"].read_text()


def test_report_markdown_links_figures_and_shows_key_metrics(written):
    _, paths, *_ = written
    report = paths["report"].read_text()
    metrics = json.loads(paths["metrics"].read_text())
    assert f"| f1_weighted | {metrics['f1_weighted']:.4f} |" in report
    assert f"| ahf_auroc | {metrics['ahf_auroc']:.4f} |" in report
    for name in ZONE_NAMES:
        assert f"| {name} | {int(metrics[f'{name}/support'])} |" in report
    for key, path in paths.items():
        if path.suffix == ".png":
            assert f"]({path.name})" in report, key
    assert "micro-average" in report


def test_tiny_datasets_do_not_crash(tmp_path):
    # one image with no graded zone: no grade metrics, no curves, empty AHF table
    probs = np.full((1, 6, 5), 0.2)
    paths = write_evaluation(tmp_path / "one", "val", ["only"], probs, np.full((1, 6), 4))
    assert "none: no grade has both positives and negatives" in paths["report"].read_text()
    assert json.loads(paths["metrics"].read_text())["f1_macro"] is None
    assert pd.read_csv(paths["ahf_csv"], sep=CSV_SEPARATOR)["support"].sum() == 0

    # two images, only grades 0 and 2: absent grades are left out of the curves, the micro-average stays
    targets = np.array([[0, 0, 2, 2, 4, 0], [2, 0, 0, 2, 2, 2]])
    probs = np.random.default_rng(0).dirichlet(np.ones(5), size=(2, 6))
    paths = write_evaluation(tmp_path / "two", "val", ["a", "b"], probs, targets)
    report = paths["report"].read_text()
    assert "| normal |" in report and "| moderate |" in report and "| micro-average | 11 |" in report
    assert "| mild |" not in report.split("## One-vs-rest")[1]
    assert all(path.exists() for path in paths.values())


def test_wrong_number_of_file_ids_is_refused(tmp_path):
    with pytest.raises(ValueError, match="file_ids: expected 2 ids"):
        write_evaluation(tmp_path, "val", ["a"], np.full((2, 6, 5), 0.2), np.zeros((2, 6), dtype=int))


def test_confusion_colour_bars_count_whole_images(tmp_path):
    """A count's colour bar ticks whole numbers and says what it counts (it showed 0.5, 1.5, ... unlabelled)."""
    from csi_dist.evaluation.report import _confusion_figure
    matrix = np.zeros((5, 5), dtype=np.int64)
    matrix[0, 0], matrix[1, 2], matrix[3, 3] = 3, 1, 2  # a maximum of 3: matplotlib's own ticks were 0.0-3.0 by 0.5
    figure = _confusion_figure(matrix, CLASS_NAMES, "test: right_sup", "images")
    colour_bar = figure.axes[-1]
    figure.savefig(tmp_path / "confusion.png")  # ticks are final once drawn
    ticks = [tick for tick in colour_bar.get_yticks() if 0 <= tick <= 3]
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks
    assert colour_bar.get_ylabel() == "number of images"
