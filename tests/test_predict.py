"""csi_dist.predict: unlabelled images of every supported format through training's image path and model."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO_ROOT, subprocess_env, torchrun_command
from data_helpers import write_dicom
from csi_dist.cluster.preemption import REQUEST_FILE_NAME
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.core.domain import CLASS_NAMES, CSV_SEPARATOR, FILE_ID_COLUMN, ZONE_NAMES
from csi_dist.predict import main as predict_main

PROB_COLUMNS = [f"{zone}_p_{name}" for zone in ZONE_NAMES for name in CLASS_NAMES]


def run(*args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    command = torchrun_command(nproc, *args) if nproc > 1 else [sys.executable, *args]
    return subprocess.run(command, env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def run_predict(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return run("-m", "csi_dist.predict", *args, nproc=nproc)


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep=CSV_SEPARATOR, dtype={FILE_ID_COLUMN: str})


@pytest.mark.slow
def test_predict_matches_evaluate_on_every_format_and_lists_unreadable_files(phantom_shards: Path, trained_run: Path,
                                                                            tmp_path: Path):
    run_dir = trained_run  # trained and evaluated on the test split by the fixture
    evaluation = read_csv(run_dir / "evaluation" / "test_predictions.csv").set_index(FILE_ID_COLUMN)
    test_ids = list(evaluation.index)
    assert len(test_ids) >= 4

    # the test split's source images (the phantom's own 256 px PNGs) in mixed formats, pixel-identical to the
    # sources except the NIfTI (percentile-windowed on load), plus a corrupt file and a file that is no image
    raw = phantom_shards / "raw" / "images"
    folder = tmp_path / "new_images"
    folder.mkdir()
    dicom_id, nifti_source = test_ids[0], test_ids[1]
    for file_id in test_ids[1:]:
        shutil.copy(raw / f"{file_id}.png", folder / f"{file_id}.png")
    write_dicom(folder / f"{dicom_id}.dcm", np.asarray(Image.open(raw / f"{dicom_id}.png")), window=(128, 256), bits=8)
    pixels = np.asarray(Image.open(raw / f"{nifti_source}.png")).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(pixels.T, np.diag([-1.0, -1.0, 1.0, 1.0])), folder / "as_nifti.nii.gz")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (folder / "notes.txt").write_text("not an image\n")

    out = tmp_path / "out" / "predictions.csv"
    predicted = run_predict("--run-dir", str(run_dir), "--images", str(folder), "--out", str(out),
                            "--batch-size", "5", "--heatmaps", "1")
    assert predicted.returncode == 0, predicted.stderr[-4000:]
    assert "Traceback" not in predicted.stderr
    errors = read_csv(tmp_path / "out" / "predictions_errors.csv")
    assert list(errors.columns) == [FILE_ID_COLUMN, "path", "reason"]
    assert errors[FILE_ID_COLUMN].tolist() == ["corrupt"] and "CorruptImageError" in errors["reason"][0]
    assert "1 could not be read" in predicted.stderr
    first = sorted([*test_ids, "as_nifti"])[0]  # --heatmaps 1: the first predicted image's 6 zone maps and grid
    assert {path.name for path in (tmp_path / "out" / "predictions_heatmaps").glob("*.png")} == \
        {f"{first}_{zone}.png" for zone in ZONE_NAMES} | {f"{first}_zones.png"}

    predictions = read_csv(out)
    assert predictions[FILE_ID_COLUMN].tolist() == sorted([*test_ids, "as_nifti"])  # the folder's name order
    assert predictions["path"].tolist() == [str(path) for path in sorted(folder.glob("*.*"))
                                            if path.name not in ("corrupt.png", "notes.txt")]
    assert set(predictions.columns) - {"path"} <= set(evaluation.columns) | {FILE_ID_COLUMN}  # evaluate's names
    assert set(PROB_COLUMNS) <= set(predictions.columns)
    probs = predictions[PROB_COLUMNS].to_numpy().reshape(-1, 6, 5)
    assert np.allclose(probs.sum(axis=-1), 1.0, atol=1e-5)
    written = pd.read_csv(out, sep=CSV_SEPARATOR, dtype=str)[PROB_COLUMNS].to_numpy().ravel()  # as written
    assert max(len(cell.split("e")[0].replace(".", "").lstrip("0")) for cell in written) <= 6  # not 17 digits
    assert (predictions[[f"{zone}_pred" for zone in ZONE_NAMES]].to_numpy() == probs.argmax(axis=-1)).all()

    same = predictions.set_index(FILE_ID_COLUMN).loc[test_ids]
    np.testing.assert_allclose(same[PROB_COLUMNS].to_numpy(), evaluation[PROB_COLUMNS].to_numpy(), atol=1e-5, rtol=0)
    for column in ("csi_expected_pred", "csi_avg_pred"):
        np.testing.assert_allclose(same[column].to_numpy(), evaluation[column].to_numpy(), atol=1e-5, rtol=0)
    for column in ("ahf_class_pred", *[f"{zone}_pred" for zone in ZONE_NAMES]):
        assert same[column].tolist() == evaluation[column].tolist(), column

    # 2 processes, a FileID list (a label CSV as it is) with an id that has no image: the same numbers, row order
    listed_ids = [test_ids[2], "99999999", *test_ids[3:], dicom_id]
    labels = read_csv(phantom_shards / "raw" / "labels.csv").set_index(FILE_ID_COLUMN)
    listing = labels.reindex(listed_ids).reset_index()
    listing.to_csv(tmp_path / "list.csv", sep=CSV_SEPARATOR, index=False)
    out_two = tmp_path / "two.csv"
    two = run_predict("--run-dir", str(run_dir), "--list", str(tmp_path / "list.csv"), "--images", str(folder),
                      "--out", str(out_two), "--weights", "best", nproc=2)
    assert two.returncode == 0, two.stderr[-4000:]
    from_list = read_csv(out_two)
    assert from_list[FILE_ID_COLUMN].tolist() == [file_id for file_id in listed_ids if file_id != "99999999"]
    np.testing.assert_allclose(from_list[PROB_COLUMNS].to_numpy(),
                               evaluation.loc[from_list[FILE_ID_COLUMN], PROB_COLUMNS].to_numpy(), atol=1e-5, rtol=0)
    missing = read_csv(tmp_path / "two_errors.csv")
    assert missing[FILE_ID_COLUMN].tolist() == ["99999999"] and "MissingImageError" in missing["reason"][0]

    # nothing readable, or no such weights: exit 2 with the reason, no traceback
    only_corrupt = tmp_path / "only_corrupt"
    only_corrupt.mkdir()
    shutil.copy(folder / "corrupt.png", only_corrupt / "corrupt.png")
    unreadable = run_predict("--run-dir", str(run_dir), "--images", str(only_corrupt), "--out",
                             str(tmp_path / "none.csv"))
    assert unreadable.returncode == 2, unreadable.stderr[-4000:]
    assert "none of the 1 image(s) could be read" in unreadable.stderr and "Traceback" not in unreadable.stderr
    assert not (tmp_path / "none.csv").exists() and (tmp_path / "none_errors.csv").is_file()
    # a preemption notice (the request file train.sbatch's trap writes): exit 75, nothing written, notice handled
    (run_dir / REQUEST_FILE_NAME).touch()
    stopped = run_predict("--run-dir", str(run_dir), "--images", str(folder), "--out", str(tmp_path / "stop.csv"))
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert "prediction stopped by a preemption notice" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not (tmp_path / "stop.csv").exists() and not (run_dir / REQUEST_FILE_NAME).exists()
    no_weights = run_predict("--run-dir", str(run_dir), "--images", str(folder), "--weights",
                             str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "w.csv"))
    assert no_weights.returncode == 2 and "absent.safetensors" in no_weights.stderr
    assert "Traceback" not in no_weights.stderr


def test_no_images_or_no_folder_exits_2_naming_the_folder(tmp_path: Path, caplog):
    """In this process (the command line's main): the inputs are checked before anything is launched or loaded."""
    run_dir = tmp_path / "run"  # only a config: inputs are checked before weights are loaded
    run_dir.mkdir()
    shutil.copy(REPO_ROOT / "configs" / "demo.ini", run_dir / "resolved_config.ini")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here\n")
    for folder, message in ((empty, "no images found"), (tmp_path / "no_such_folder", "no such folder")):
        caplog.clear()
        assert predict_main(["--run-dir", str(run_dir), "--images", str(folder), "--out", str(tmp_path / "p.csv")]) == 2
        assert str(folder) in caplog.text and message in caplog.text, caplog.text
    caplog.clear()
    assert predict_main(["--run-dir", str(tmp_path / "no_run"), "--images", str(empty)]) == 2
    assert "no_run: no such run directory" in caplog.text
