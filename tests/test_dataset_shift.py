"""External validation: evaluate on other shards writes a dataset-shift summary that warns where the data differ."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO_ROOT, subprocess_env
from csi_dist.data.phantom import generate_phantom
from csi_dist.data.shards.writer import write_shards
from csi_dist.evaluation.dataset_shift import compare_grades, compare_values

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def brighter_sicker_shards(tmp_path_factory) -> Path:
    """Another 'site': phantom images of the sicker patients only (CSI >= 1.6: grades shifted up), drawn brighter
    and flatter (pixels x 0.5 + 120), all in the test split."""
    root = tmp_path_factory.mktemp("external")
    csv_path = generate_phantom(root / "raw", 120, image_size=64, seed=7, workers=1)
    labels = pd.read_csv(csv_path, sep=";", dtype={"FileID": str})
    mild = set(labels.loc[~(labels["csi"] >= 1.6), "FileID"])
    for file_id in set(labels["FileID"]) - mild:
        path = csv_path.parent / "images" / f"{file_id}.png"
        pixels = np.asarray(Image.open(path), dtype=float)
        Image.fromarray(np.clip(pixels * 0.5 + 120, 0, 255).astype(np.uint8)).save(path)
    write_shards(csv_path, csv_path.parent / "images", root / "shards", image_size=32, workers=1,
                 split_fractions=(0.0, 0.0, 1.0), exclude_ids=mild)
    return root / "shards"


def shard_pixels(shards: Path, split: str) -> np.ndarray:
    """Every pixel of a split's images, read with tarfile and PIL."""
    manifest = json.loads((shards / "manifest.json").read_text())
    pixels = []
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(shards / entry["path"]) as tar:
            pixels += [np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read()))).ravel()
                       for member in tar if member.name.endswith(".png")]
    return np.concatenate(pixels)


def test_evaluating_on_brighter_sicker_shards_warns_of_the_shift(brighter_sicker_shards, phantom_shards,
                                                                 trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path / "run")  # its evaluation folder and model card change here
    trained_run = tmp_path / "run"
    own_report = (trained_run / "evaluation" / "test_report.md").read_bytes()
    result = subprocess.run([sys.executable, "-m", "csi_dist.evaluate", "--run-dir", str(trained_run), "--splits",
                             "test", "--shard-dir", str(brighter_sicker_shards), "--bootstrap-resamples", "50"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert result.returncode == 0, result.stderr[-3000:]
    # without --out, beside the run's own reports, never over them; the run's model card names it
    assert (trained_run / "evaluation" / "test_report.md").read_bytes() == own_report
    (tmp_path / "external").symlink_to(trained_run / "evaluation" / "external" / brighter_sicker_shards.name)
    card = (trained_run / "evaluation" / "model_card.md")
    from csi_dist.evaluation.model_card import write_model_card
    write_model_card(card.parent, trained_run)  # as the run's next own evaluation writes it
    assert f"`{brighter_sicker_shards}`" in card.read_text() and "WARNING" in card.read_text()
    summary = json.loads((tmp_path / "external" / "test_dataset_shift.json").read_text())
    strong = {comparison["quantity"] for comparison in summary["comparisons"] if comparison["strong"]}
    assert {"zone grades (labels)", "CSI average (labels)", "image brightness (mean pixel value per image)"} <= strong
    report = (tmp_path / "external" / "test_dataset_shift.md").read_text()
    assert "**WARNING**: these data differ strongly from the data the model was trained on" in report
    assert "image brightness" in summary["warning"] and "dataset shift" in result.stderr
    assert "## Dataset shift" in (tmp_path / "external" / "test_report.md").read_text()
    # the pixel statistics are those of the images in the shards (all of them: fewer than the sample size)
    external, training = shard_pixels(brighter_sicker_shards, "test"), shard_pixels(phantom_shards, "train")
    assert summary["pixel_values"]["evaluated"]["mean"] == pytest.approx(external.mean())
    assert summary["pixel_values"]["evaluated"]["std"] == pytest.approx(external.std())
    assert summary["pixel_values"]["evaluated"]["p50"] == int(np.percentile(external, 50, method="inverted_cdf"))
    assert summary["pixel_values"]["training"]["mean"] == pytest.approx(training.mean())


def test_the_measures_are_scipys_and_the_threshold_needs_size_and_evidence():
    from scipy.stats import ks_2samp
    rng = np.random.default_rng(0)
    same = compare_values("x", rng.normal(0, 1, 30), rng.normal(0, 1, 120))
    shifted = compare_values("x", rng.normal(1.5, 1, 30), rng.normal(0, 1, 120))
    assert not same.strong and shifted.strong
    new, old = rng.normal(0.05, 1, 20000), rng.normal(0, 1, 20000)  # significant, but a trivial difference
    trivial = compare_values("x", new, old)
    assert trivial.p_value < 0.001 and not trivial.strong
    assert trivial.difference == pytest.approx(ks_2samp(new, old).statistic)
    grades = compare_grades("g", np.array([10, 10, 30, 40, 10]), np.array([40, 30, 20, 5, 5]))
    assert grades.difference == pytest.approx(0.5 * (0.3 + 0.2 + 0.1 + 0.35 + 0.05)) and grades.strong
