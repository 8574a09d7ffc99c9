"""Patient-level split: determinism, no leakage, proportions and split-file reuse."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from csi_dist.data.split import SPLIT_COLUMN, SplitError, apply_split_file, load_split, save_split, split_patients
from csi_dist.domain import FILE_ID_COLUMN, PATIENT_COLUMN, UNKNOWN_CLASS, ZONE_NAMES


def make_labels(n_patients: int = 300, seed: int = 1, with_patients: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        for image in range(1 + int(rng.random() < 0.3)):
            zones = rng.integers(0, 4, len(ZONE_NAMES))
            zones[rng.random(len(ZONE_NAMES)) < 0.1] = UNKNOWN_CLASS
            rows.append({FILE_ID_COLUMN: f"{patient}{image:02d}", **dict(zip(ZONE_NAMES, zones)),
                         PATIENT_COLUMN: f"P{patient}"})
    labels = pd.DataFrame(rows)
    return labels if with_patients else labels.drop(columns=[PATIENT_COLUMN])


def test_split_is_deterministic_and_order_independent():
    labels = make_labels()
    first = split_patients(labels, seed=42)
    assert first.equals(split_patients(labels, seed=42))
    shuffled = labels.sample(frac=1.0, random_state=0).reset_index(drop=True)
    again = split_patients(shuffled, seed=42).set_index(FILE_ID_COLUMN)[SPLIT_COLUMN]
    assert again.loc[first[FILE_ID_COLUMN]].tolist() == first[SPLIT_COLUMN].tolist()
    assert not first.equals(split_patients(labels, seed=7))


def test_no_patient_in_two_splits_and_fractions_kept():
    labels = make_labels()
    split = split_patients(labels, fractions=(0.7, 0.15, 0.15))
    assert (split.groupby(PATIENT_COLUMN)[SPLIT_COLUMN].nunique() == 1).all()
    patients_per_split = split.drop_duplicates(PATIENT_COLUMN)[SPLIT_COLUMN].value_counts()
    assert abs(patients_per_split["train"] - 210) <= 2
    assert abs(patients_per_split["val"] - 45) <= 2 and abs(patients_per_split["test"] - 45) <= 2


def test_without_patient_column_each_image_is_its_own_group():
    labels = make_labels(100, with_patients=False)
    split = split_patients(labels)
    counts = split[SPLIT_COLUMN].value_counts()
    for name, fraction in zip(("train", "val", "test"), (0.7, 0.15, 0.15)):
        assert abs(counts[name] - fraction * len(labels)) <= 2
    assert (split[PATIENT_COLUMN] == "").all()


def test_rare_grade_mixes_are_explained_in_plain_words(caplog):
    with caplog.at_level(logging.INFO, logger="csi_dist.data.split"):
        split_patients(make_labels(30))
    message = next(record.getMessage() for record in caplog.records if "rare" in record.getMessage())
    assert message.startswith("split: train, val and test get the same mix of grades, except for 4 rare mix(es) with "
                              "fewer than 7 patients each (mean grade 1, no unknown zone; ")
    assert message.endswith("so their patients are shared out together")
    assert "strat" not in message and "pooling" not in message and "g1-u0" not in message


def test_tiny_dataset_is_split_without_error():
    split = split_patients(make_labels(3), fractions=(0.6, 0.2, 0.2))
    assert len(split) >= 3 and split[SPLIT_COLUMN].isin(["train", "val", "test"]).all()


def test_bad_fractions_are_rejected():
    with pytest.raises(SplitError, match="summing to 1"):
        split_patients(make_labels(10), fractions=(0.5, 0.2, 0.2))


def test_split_file_round_trip_and_missing_ids(tmp_path):
    labels = make_labels(50)
    split = split_patients(labels)
    save_split(split, tmp_path / "split.csv")
    assert load_split(tmp_path / "split.csv").equals(split)
    assert apply_split_file(labels, tmp_path / "split.csv").equals(split)

    more = pd.concat([labels, labels.iloc[:1].assign(**{FILE_ID_COLUMN: "new-id"})], ignore_index=True)
    with pytest.raises(SplitError, match=r"1 FileID.*not in the split file.*new-id"):
        apply_split_file(more, tmp_path / "split.csv")


def test_split_file_with_patient_leak_is_rejected(tmp_path):
    labels = make_labels(50)
    split = split_patients(labels)
    patient = split[PATIENT_COLUMN].value_counts().index[0]  # a patient with two images
    rows = split.index[split[PATIENT_COLUMN] == patient]
    split.loc[rows[0], SPLIT_COLUMN], split.loc[rows[1], SPLIT_COLUMN] = "train", "test"
    save_split(split, tmp_path / "split.csv")
    with pytest.raises(SplitError, match=f"{patient}.*more than one split"):
        apply_split_file(labels, tmp_path / "split.csv")
