"""Phantom dataset: users' CSV format, determinism, and grades a model can see."""
from __future__ import annotations

import numpy as np

from csi_dist.data.labels import read_label_csv
from csi_dist.data.phantom import generate_phantom, phantom_image, zone_boxes
from csi_dist.core.domain import AHF_COLUMN, CSI_COLUMN, PATIENT_COLUMN, UNKNOWN_CLASS, ZONE_NAMES


def test_phantom_is_deterministic_and_readable(tmp_path):
    first = generate_phantom(tmp_path / "a", 130, image_size=48, seed=3, workers=1)
    second = generate_phantom(tmp_path / "b", 130, image_size=48, seed=3, workers=2)
    assert first.read_bytes() == second.read_bytes()
    labels = read_label_csv(first)
    assert len(labels) == 130
    for file_id in labels["FileID"]:
        assert (first.parent / "images" / f"{file_id}.png").read_bytes() == \
            (second.parent / "images" / f"{file_id}.png").read_bytes()
    assert labels[PATIENT_COLUMN].value_counts().max() == 2  # some patients have a follow-up image
    assert set(labels[AHF_COLUMN].unique()) == {0.0, 1.0}
    other = generate_phantom(tmp_path / "c", 130, image_size=48, seed=4, workers=1)
    assert other.read_bytes() != first.read_bytes()


def test_ahf_correlates_with_csi(tmp_path):
    labels = read_label_csv(generate_phantom(tmp_path, 300, image_size=32, seed=0, workers=1))
    by_ahf = labels.groupby(AHF_COLUMN)[CSI_COLUMN].mean()
    assert by_ahf[1.0] > by_ahf[0.0] + 0.3
    unknown_share = (labels[list(ZONE_NAMES)] == UNKNOWN_CLASS).to_numpy().mean()
    assert 0.05 < unknown_share < 0.15


def test_zone_brightness_grows_with_grade_and_unknown_is_blank():
    size = 96
    top, bottom, left, right = zone_boxes(size)["right_mid"]
    # Inner half of the un-jittered box stays inside the zone under the phantom's small shifts.
    inner = (slice(top + (bottom - top) // 4, bottom - (bottom - top) // 4),
             slice(left + (right - left) // 4, right - (right - left) // 4))
    assert right <= size // 2  # patient right is on the image left
    means = {}
    for grade in (0, 1, 2, 3, UNKNOWN_CLASS):
        zones = [0] * len(ZONE_NAMES)
        zones[ZONE_NAMES.index("right_mid")] = grade
        means[grade] = np.mean([phantom_image(zones, np.random.default_rng(seed), size)[inner].mean()
                                for seed in range(20)])
    assert means[0] + 10 < means[1] < means[2] - 10 < means[3] - 20
    assert means[UNKNOWN_CLASS] > 240
