"""Image lookup and decoding: formats, windowing, orientation and corrupt files."""
from __future__ import annotations

import nibabel
import numpy as np
import pytest
from PIL import Image

from csi_dist.data.images import (
    CorruptImageError,
    MissingImageError,
    build_image_index,
    find_image,
    load_grayscale,
    resize_square,
)
from data_helpers import gradient_image, write_dicom, write_png


def test_find_image_tries_suffixes_case_insensitively(tmp_path):
    write_png(tmp_path / "100.PNG", gradient_image())
    (tmp_path / "200.Nii.Gz").write_bytes(b"x")
    assert find_image(tmp_path, "100") == tmp_path / "100.PNG"
    assert find_image(tmp_path, "200") == tmp_path / "200.Nii.Gz"
    assert build_image_index(tmp_path) == {"100": tmp_path / "100.PNG", "200": tmp_path / "200.Nii.Gz"}
    with pytest.raises(MissingImageError, match="'300'"):
        find_image(tmp_path, "300")


def test_png_8bit_is_kept_and_rgb_uses_luminance(tmp_path):
    pixels = gradient_image()
    assert np.array_equal(load_grayscale(write_png(tmp_path / "a.png", pixels)), pixels)
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200
    assert load_grayscale(write_png(tmp_path / "b.png", rgb)).tolist() == [[117] * 4] * 4


def test_png_16bit_is_windowed_to_full_range(tmp_path):
    pixels = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    image = load_grayscale(tmp_path / "deep.png")
    assert image.dtype == np.uint8 and image.shape == (64, 64)
    assert image.min() == 0 and image.max() == 255
    assert np.all(np.diff(image.ravel().astype(int)) >= 0)  # monotone mapping


def test_dicom_monochrome1_is_inverted_and_16bit_windowed(tmp_path):
    pixels = np.tile(np.linspace(0, 4000, 32), (16, 1)).astype(np.uint16)
    mono2 = load_grayscale(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2"))
    mono1 = load_grayscale(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1"))
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255  # percentile window spans 8 bits
    assert np.array_equal(mono1, 255 - mono2)  # high stored value = dark in MONOCHROME1


def test_dicom_rescale_and_voi_window(tmp_path):
    pixels = np.array([[0, 100, 150, 300]], dtype=np.uint16).repeat(2, axis=0)
    # stored * 2 - 100 -> [-100, 100, 200, 500]; window centre 200, width 200 -> [0, 0, mid-grey, 255]
    path = write_dicom(tmp_path / "w.dcm", pixels, window=(200, 200), slope=2, intercept=-100)
    image = load_grayscale(path)
    assert image[0].tolist() == [0, 0, 128, 255]


def test_nifti_seed_orientation_round_trip(tmp_path):
    original = gradient_image(40, 30)
    # The seed exporter stored rot90(image) as H x W x 1 float.
    exported = np.rot90(original).astype(np.float32)[..., None]
    nibabel.save(nibabel.Nifti1Image(exported, affine=np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "1.nii.gz")
    image = load_grayscale(tmp_path / "1.nii.gz")
    assert image.shape == original.shape
    # Windowing rescales values but keeps their order, so the rank pattern must match the original exactly.
    assert np.corrcoef(image.ravel(), original.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name", ["t.png", "t.jpg"])
def test_truncated_file_is_corrupt(tmp_path, name):
    full = tmp_path / f"full_{name}"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(full)
    (tmp_path / name).write_bytes(full.read_bytes()[:200])
    with pytest.raises(CorruptImageError) as error:
        load_grayscale(tmp_path / name)
    assert name in str(error.value)


def test_missing_file_and_garbage_dicom(tmp_path):
    with pytest.raises(MissingImageError):
        load_grayscale(tmp_path / "none.png")
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom at all")
    with pytest.raises(CorruptImageError, match="bad.dcm"):
        load_grayscale(tmp_path / "bad.dcm")


def test_resize_square_stretches(tmp_path):
    resized = resize_square(gradient_image(40, 30), 16)
    assert resized.shape == (16, 16) and resized.dtype == np.uint8
