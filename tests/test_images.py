"""Image lookup and decoding: formats, windowing, orientation and corrupt files."""
from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pytest
from PIL import Image

from csi_dist.data.radiographs import (
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


def _marked_radiograph(height: int = 6, width: int = 8) -> np.ndarray:
    """A dark H x W radiograph as displayed, bright only top-left: the patient's right, superior corner."""
    pixels = np.zeros((height, width), dtype=np.float32)
    pixels[0, 0] = 1000.0
    return pixels


def _nifti_plain_ras(display):
    # Identity affine: voxel axis 0 runs to the patient's right, axis 1 anteriorly (up, for a 2-D image), so the
    # displayed top-left corner is the last voxel of both axes.
    data = np.zeros(display.shape[::-1], dtype=np.float32)
    data[-1, -1] = display.max()
    return data, np.eye(4)


def _nifti_dicom_coronal(display):
    # A 2-D DICOM (ImageOrientationPatient 1,0,0 / 0,0,-1) written the ITK way: data[column, row], columns running to
    # the patient's left and rows downwards (inferior), which in RAS are -x and -z.
    affine = np.array([[-0.5, 0, 0, 0], [0, 0, -1, 0], [0, -0.5, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return display.T.copy(), affine


def _nifti_2d_seed_affine(display):
    # The seed's affine on a plain 2-D array: columns to the patient's left, rows posterior (down).
    return display.T.copy(), np.diag([-0.5, -0.5, 1.0, 1.0])


def _nifti_seed_export(display):
    # The seed exporter: rot90 (counter-clockwise), H x W x 1 float32, diagonal affine with negated x/y from the pixel
    # spacing and a translation from ImagePositionPatient.
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    affine[:3, 3] = [120.0, -40.0, 300.0]
    return np.rot90(display).astype(np.float32)[..., None], affine


@pytest.mark.parametrize("layout", [_nifti_plain_ras, _nifti_dicom_coronal, _nifti_2d_seed_affine, _nifti_seed_export],
                         ids=["identity-2d", "dicom-coronal-2d", "seed-affine-2d", "seed-export"])
def test_nifti_orientation_puts_patient_right_superior_top_left(tmp_path, layout):
    display = _marked_radiograph()
    data, affine = layout(display)
    nibabel.save(nibabel.Nifti1Image(data, affine), tmp_path / "x.nii.gz")
    image = load_grayscale(tmp_path / "x.nii.gz")
    assert image.shape == display.shape
    assert np.unravel_index(np.argmax(image), image.shape) == (0, 0)
    assert image[0, 0] == 255 and np.count_nonzero(image) == 1


def test_nifti_volume_is_refused_by_name(tmp_path):
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 6, 2), dtype=np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    with pytest.raises(CorruptImageError, match=r"vol\.nii\.gz.*\(8, 6, 2\)"):
        load_grayscale(tmp_path / "vol.nii.gz")


# Index -> (R, G, B): black, pure red, pure green, white; their BT.601 lumas are 0, 76, 150, 255.
PALETTE_RGB = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [255, 255, 255]])
PALETTE_GREYS = [0, 76, 150, 255]


def _palette_elements(entry_bits: int) -> dict:
    elements = {}
    for channel, name in enumerate(("Red", "Green", "Blue")):
        values = PALETTE_RGB[:, channel]
        if entry_bits == 16:
            values = values * 257  # full 16-bit scale for the same colours
        elements[f"{name}PaletteColorLookupTableDescriptor"] = [len(values), 0, entry_bits]
        elements[f"{name}PaletteColorLookupTableData"] = values.astype(f"<u{entry_bits // 8}").tobytes()
    return elements


@pytest.mark.parametrize("entry_bits", [8, 16])
def test_dicom_palette_color_is_converted_through_its_palette(tmp_path, entry_bits):
    indices = np.tile(np.arange(4, dtype=np.uint8), (6, 2))  # 6 x 8
    path = write_dicom(tmp_path / "p.dcm", indices, "PALETTE COLOR", bits=8, **_palette_elements(entry_bits))
    image = load_grayscale(path)
    assert image.tolist() == [PALETTE_GREYS * 2] * 6


def test_dicom_palette_color_without_palette_is_refused_by_name(tmp_path):
    elements = {key: value for key, value in _palette_elements(8).items() if key.endswith("Descriptor")}
    path = write_dicom(tmp_path / "nolut.dcm", np.zeros((6, 8), dtype=np.uint8), "PALETTE COLOR", bits=8, **elements)
    with pytest.raises(CorruptImageError, match=r"nolut\.dcm.*PALETTE COLOR"):
        load_grayscale(path)


@pytest.mark.parametrize("suffix", [".png", ".dcm", ".nii.gz"])
def test_constant_image_is_mid_grey_not_black(tmp_path, suffix):
    pixels = np.full((6, 8), 1000, dtype=np.uint16)
    path = tmp_path / f"flat{suffix}"
    if suffix == ".png":
        Image.fromarray(pixels).save(path)
    elif suffix == ".dcm":
        write_dicom(path, pixels)
    else:
        nibabel.save(nibabel.Nifti1Image(pixels.T.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0])), path)
    image = load_grayscale(path)
    assert image.shape == (6, 8)
    assert np.unique(image).tolist() == [128]


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


def test_file_ids_find_their_image_as_written_or_in_the_seed_integer_form(tmp_path: Path):
    """FileIDs are text; a whole number saved with a ".0" tail still finds the seed's int(FileID) image."""
    from csi_dist.data.radiographs import build_image_index, image_for
    for name in ("28694662.png", "20200101.00.png", "20200101.png", "00123.png"):
        Image.new("L", (4, 4)).save(tmp_path / name)
    index = build_image_index(tmp_path)
    assert image_for(index, "28694662.0") == tmp_path / "28694662.png"
    assert image_for(index, "20200101.00") == tmp_path / "20200101.00.png"  # the exact name wins
    assert image_for(index, "00123") == tmp_path / "00123.png"
    assert image_for(index, "123") is None and image_for(index, "7.5") is None
