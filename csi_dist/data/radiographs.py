"""Find and decode one chest radiograph (PNG, JPEG, DICOM or NIfTI) into a 2-D 8-bit grayscale array."""
from __future__ import annotations

import glob
import io
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Tried in this order; a FileID with several matching files uses the first.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".nii.gz", ".nii")
PERCENTILE_WINDOW: tuple[float, float] = (0.5, 99.5)
# A constant image has no contrast to window. Black would make it look like padding or an empty exposure and put it at
# the far end of the normalisation range; mid-grey is neutral, and the same whatever the constant was.
CONSTANT_IMAGE_GREY = 128
DEFAULT_JPEG_QUALITY = 95  # of shards stored as JPEG
# ITU-R BT.601 luma, the weights PIL's "L" conversion uses; written out so RGB handling does not depend on a mode.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class ImageError(Exception):
    """An image that cannot be used; `path` names the file (or the path that was looked for)."""

    def __init__(self, path: str | Path, cause: str):
        super().__init__(f"{path}: {cause}")
        self.path = Path(path)
        self.cause = cause


class MissingImageError(ImageError):
    """No image file exists for a FileID."""


class CorruptImageError(ImageError):
    """An image file exists but cannot be decoded into a 2-D grayscale image."""


def image_suffix(path: str | Path) -> str | None:
    """The known image suffix of `path`, lower-cased (".nii.gz" counts as one suffix), or None."""
    name = Path(path).name.lower()
    return next((suffix for suffix in IMAGE_SUFFIXES if name.endswith(suffix)), None)


def _file_id_of(path: Path) -> str | None:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else None


def build_image_index(image_dir: str | Path) -> dict[str, Path]:
    """Map FileID -> image path for every file of a known suffix directly in `image_dir` (one directory scan).

    Use this instead of `find_image` per id for large directories. Suffixes match case-insensitively; when a
    FileID has several files, the suffix earliest in `IMAGE_SUFFIXES` wins.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise MissingImageError(image_dir, "image directory does not exist")
    rank = {suffix: position for position, suffix in enumerate(IMAGE_SUFFIXES)}
    index: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        file_id = _file_id_of(path)
        if file_id is None or not path.is_file():
            continue
        if file_id not in index or rank[image_suffix(path)] < rank[image_suffix(index[file_id])]:
            index[file_id] = path
    return index


def image_for(index: dict[str, Path], file_id: str) -> Path | None:
    """The image of `file_id` in a `build_image_index` map: the FileID exactly as written, else, for a whole number
    written with a ".0" tail (a numeric column saved by Excel, e.g. 28694662.0), the seed project's int(FileID) name
    (28694662.png). An exact match always wins, so 20200101.00.png is found as itself."""
    if file_id in index:
        return index[file_id]
    whole_number = re.fullmatch(r"(\d+)\.0+", file_id)
    return index.get(whole_number.group(1)) if whole_number else None


def find_image(image_dir: str | Path, file_id: str) -> Path:
    """Path of the image of `file_id` in `image_dir`, trying `IMAGE_SUFFIXES` in order (case-insensitive)."""
    image_dir = Path(image_dir)
    for suffix in IMAGE_SUFFIXES:
        for candidate in (image_dir / f"{file_id}{suffix}", image_dir / f"{file_id}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    # Mixed-case suffixes (".Png") only show up in a directory listing.
    matches = {image_suffix(path): path for path in image_dir.glob(glob.escape(file_id) + ".*")
               if _file_id_of(path) == file_id and path.is_file()}
    for suffix in IMAGE_SUFFIXES:
        if suffix in matches:
            return matches[suffix]
    raise MissingImageError(image_dir / file_id, f"no image for FileID {file_id!r} with any suffix of {IMAGE_SUFFIXES}")


def window_to_uint8(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to [0, 255], clipping outside; a degenerate window gives an all-zero image."""
    if not high > low:
        return np.zeros(pixels.shape, dtype=np.uint8)
    scaled = (pixels.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def percentile_window(pixels: np.ndarray) -> np.ndarray:
    """Window to 8 bits between the `PERCENTILE_WINDOW` percentiles, robust to a few hot or dead pixels.

    A constant image becomes `CONSTANT_IMAGE_GREY` everywhere.
    """
    finite = pixels[np.isfinite(pixels)]
    if finite.size == 0:
        return np.zeros(pixels.shape, dtype=np.uint8)
    low, high = np.percentile(finite, PERCENTILE_WINDOW)
    if not high > low:  # nearly constant image: fall back to the full range before giving up
        low, high = float(finite.min()), float(finite.max())
    if not high > low:
        return np.full(pixels.shape, CONSTANT_IMAGE_GREY, dtype=np.uint8)
    return window_to_uint8(np.nan_to_num(pixels, nan=low), low, high)


def _to_luminance(pixels: np.ndarray) -> np.ndarray:
    """H x W x C (RGB or RGBA, alpha ignored) -> H x W float64 luminance; 2-D input returned unchanged."""
    if pixels.ndim == 3 and pixels.shape[2] >= 3:
        return pixels[..., :3].astype(np.float64) @ LUMA_WEIGHTS
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):  # gray or gray+alpha
        return pixels[..., 0]
    return pixels


def _load_pil(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if image.mode == "P":
            image = image.convert("RGBA")
        elif image.mode == "CMYK":
            image = image.convert("RGB")
        elif image.mode == "1":
            image = image.convert("L")
        pixels = np.asarray(image)
    if pixels.dtype == np.uint8:
        luminance = _to_luminance(pixels)
        return luminance if luminance.dtype == np.uint8 else np.clip(np.rint(luminance), 0, 255).astype(np.uint8)
    # 16-bit and float images carry more range than a display; pick a robust window.
    return percentile_window(_to_luminance(pixels).astype(np.float64))


def _first_value(value) -> float:
    """DICOM WindowCenter/Width may be multi-valued (several presets); the first is the default."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _voi_window(pixels: np.ndarray, dataset) -> np.ndarray | None:
    """Apply the DICOM VOI window (PS3.3 C.11.2.1.2) to 8 bits, or None when the header has no usable window."""
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    center, width = _first_value(dataset.WindowCenter), _first_value(dataset.WindowWidth)
    if not width >= 1:
        return None
    if str(dataset.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":
        return np.rint(255.0 / (1.0 + np.exp(-4.0 * (pixels - center) / width))).astype(np.uint8)
    # LINEAR: the standard's window, centred at center - 0.5 over width - 1 steps.
    scaled = ((pixels - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _palette_to_grey(path: Path, indices: np.ndarray, dataset) -> np.ndarray:
    """PALETTE COLOR: look the stored indices up in the file's palette, then take the colours' luminance.

    The palette fixes the displayed colour of every index, so neither Rescale nor VOI windowing applies
    (PS3.3 C.7.6.3.1.2), and the luminance is scaled from the palette's full range, not windowed.
    """
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(indices, dataset)
        entry_bits = int(dataset.RedPaletteColorLookupTableDescriptor[2])
    except Exception as err:  # missing or malformed LUT elements raise ValueError, AttributeError, IndexError, ...
        raise CorruptImageError(path, f"PALETTE COLOR image whose palette cannot be applied: "
                                      f"{type(err).__name__}: {err}") from err
    full_scale = float(2 ** entry_bits - 1)
    grey = _to_luminance(rgb) * (255.0 / full_scale)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _load_dicom(path: Path) -> np.ndarray:
    import pydicom

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"multi-frame DICOM with {dataset.NumberOfFrames} frames; expected one 2-D image")
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        return _palette_to_grey(path, pixels, dataset)
    if int(dataset.get("SamplesPerPixel", 1)) > 1:
        if photometric != "RGB":  # pydicom converts YBR to RGB only on request
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        pixels = _to_luminance(pixels)
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    pixels = pixels.astype(np.float64) * slope + intercept
    image = _voi_window(pixels, dataset)
    if image is None:
        image = percentile_window(pixels)
    if photometric == "MONOCHROME1":  # MONOCHROME1 stores bone dark; invert so bones are bright as in MONOCHROME2
        image = 255 - image
    return image


def _is_seed_export(image) -> bool:
    """Whether a NIfTI has the seed project's exporter layout (see `_load_nifti`).

    That exporter wrote through nibabel from a bare affine (sform "aligned", no qform), stored the image as
    X x Y x 1 and used a diagonal affine with negated x and y. A file from another writer with exactly this
    signature is indistinguishable and is read as a seed export too.
    """
    header = image.header
    rotation_zoom = image.affine[:3, :3]
    diagonal = np.diag(rotation_zoom)
    return (len(image.shape) == 3 and image.shape[2] == 1
            and int(header["sform_code"]) == 2 and int(header["qform_code"]) == 0
            and np.allclose(rotation_zoom, np.diag(diagonal))
            and diagonal[0] < 0 and diagonal[1] < 0 and diagonal[2] > 0)


def _ras_plane_to_display(path: Path, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Turn a NIfTI image plane into rows and columns the way a radiograph is displayed.

    The voxel axes are first reordered and flipped to nibabel's closest canonical (RAS+) orientation, so that axis
    0 runs to the patient's right, 1 anteriorly and 2 superiorly. The image plane is what is left after dropping
    the file's through-plane axis (its last axis of size 1). Of the two in-plane axes the later one (superior, or
    anterior for an axial plane) is vertical with its far end at the top, the earlier one (right, or anterior for
    a sagittal plane) horizontal with its far end at the image's left: for a frontal radiograph, the patient's
    right on the viewer's left and the apices at the top.
    """
    import nibabel.orientations as orientations

    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        volume = volume[..., None]
    through_plane = [axis for axis in range(volume.ndim) if volume.shape[axis] == 1]
    if volume.ndim != 3 or not through_plane:
        raise ValueError(f"NIfTI of shape {volume.shape}; expected a 2-D image or X x Y x 1")
    ornt = orientations.io_orientation(affine)
    if np.isnan(ornt).any():
        raise ValueError(f"NIfTI affine has a voxel axis with no direction; cannot orient it:\n{affine}")
    canonical = orientations.apply_orientation(volume, ornt)
    dropped = int(ornt[through_plane[-1], 0])
    plane = np.take(canonical, 0, axis=dropped)  # remaining axes in RAS order: horizontal, then vertical
    logger.debug("%s: NIfTI axes %s read as display rows/columns", path, "".join(orientations.aff2axcodes(affine)))
    return plane.T[::-1, ::-1]


def _load_nifti(path: Path) -> np.ndarray:
    """Read a NIfTI radiograph in display orientation (patient's right on the image's left, superior at the top).

    The voxel axes are oriented from the file's affine (`_ras_plane_to_display`), except for the seed project's
    exports (`_is_seed_export`). Its exporter rotated each radiograph 90 degrees counter-clockwise (numpy `rot90`),
    stored it H x W x 1 and wrote an affine as if it had only transposed it, so its affine mirrors the patient
    left-right. Those files get the exporter's exact inverse instead: squeeze the singleton axis, transpose, then
    mirror left-right, which restores the original DICOM orientation.
    """
    import nibabel

    image = nibabel.load(path)
    volume = np.asarray(image.get_fdata(dtype=np.float32))
    if _is_seed_export(image):
        return percentile_window(np.fliplr(volume[..., 0].T))
    return percentile_window(_ras_plane_to_display(path, volume, image.affine))


def load_grayscale(path: str | Path) -> np.ndarray:
    """Decode one image to a 2-D uint8 array with bright bones and dark lungs.

    8-bit PNG/JPEG are kept as stored (RGB converted with `LUMA_WEIGHTS`); 16-bit or float images are windowed
    between the 0.5th and 99.5th percentiles. DICOM gets Rescale slope/intercept, then its VOI window (first preset)
    or the percentile window, then MONOCHROME1 inversion; PALETTE COLOR DICOM goes through its palette to luminance.
    NIfTI is oriented as described in `_load_nifti`. A constant 16-bit or float image becomes mid-grey.
    Raises `MissingImageError` when the file does not exist and `CorruptImageError` when it cannot be decoded.
    """
    path = Path(path)
    suffix = image_suffix(path)
    if not path.is_file():
        raise MissingImageError(path, "image file does not exist")
    try:
        if suffix == ".dcm":
            image = _load_dicom(path)
        elif suffix in (".nii", ".nii.gz"):
            image = _load_nifti(path)
        else:
            image = _load_pil(path)
    except ImageError:
        raise
    except Exception as err:  # decoders raise many types (OSError, SyntaxError, zlib.error, EOFError, ...)
        raise CorruptImageError(path, f"cannot decode image: {type(err).__name__}: {err}") from err
    if image.ndim != 2 or min(image.shape) == 0:
        raise CorruptImageError(path, f"decoded to shape {image.shape}; expected a non-empty 2-D image")
    return np.ascontiguousarray(image, dtype=np.uint8)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Stretch a 2-D uint8 image to size x size with Lanczos resampling (antialiased when shrinking).

    A large shrink (a 2048 px radiograph to 224 px) first box-reduces by an integer factor down to at least 3x the
    target (Pillow's `reducing_gap`): 4x faster there, within 2 grey levels of plain Lanczos (mean 0.2).
    """
    if image.shape == (size, size):
        return image
    resized = Image.fromarray(image).resize((size, size), resample=Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized)


def encode_image_file(path: str | Path, image_size: int, image_format: str = "png",
                      jpeg_quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """The image bytes a shard stores for one image file: decoded to 8-bit grayscale, resized to image_size square,
    encoded as PNG, JPEG or a raw .npy array. Raises ImageError (the writer and csi_dist.predict share this one
    path)."""
    pixels = resize_square(load_grayscale(path), image_size)
    buffer = io.BytesIO()
    if image_format == "npy":
        np.save(buffer, np.ascontiguousarray(pixels, dtype=np.uint8), allow_pickle=False)
    elif image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=jpeg_quality)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
