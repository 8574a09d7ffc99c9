"""Per-sample image transforms: grayscale decode, resize, train-time augmentation and normalisation."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# Grayscale versions of the normalisations users know: "medical" maps [0, 1] to [-1, 1];
# "imagenet" uses the mean of ImageNet's channel statistics, matching RGB stems summed into one channel.
NORMALIZATION = {"medical": (0.5, 0.5), "imagenet": (0.449, 0.226)}


class DecodeError(ValueError):
    """Image bytes that cannot be decoded into a grayscale image."""


def decode_grayscale(image_bytes: bytes, size: int) -> torch.Tensor:
    """PNG/JPEG bytes -> uint8 tensor 1 x size x size, always single-channel (never a silent RGB)."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            if image.format == "JPEG":
                image.draft("L", (size, size))  # decode at reduced scale when the shard is larger than needed
            image = image.convert("L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            pixels = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise DecodeError(str(error)) from error
    return torch.from_numpy(pixels.copy()).unsqueeze(0)


def decode_array(array_bytes: bytes, size: int) -> torch.Tensor:
    """A stored uint8 H x W array (numpy's .npy format, shards written with --image-format npy: no decoding work)
    -> uint8 tensor 1 x size x size."""
    try:
        pixels = np.load(io.BytesIO(array_bytes), allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - numpy raises several types for a damaged header
        raise DecodeError(f"not a .npy array: {error}") from error
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise DecodeError(f"expected a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    if pixels.shape != (size, size):
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0))
    return torch.from_numpy(np.ascontiguousarray(pixels)).unsqueeze(0)


def decode_image(image_bytes: bytes, extension: str, size: int) -> torch.Tensor:
    """A shard's image member (png, jpg or npy) -> uint8 tensor 1 x size x size."""
    return decode_array(image_bytes, size) if extension == "npy" else decode_grayscale(image_bytes, size)


AUGMENT_DRAWS = 6  # uniform draws per sample: angle, scale, shift x, shift y, contrast, brightness
MAX_ANGLE_DEGREES, MAX_SCALE_CHANGE, MAX_SHIFT_FRACTION = 7.0, 0.08, 0.04
MAX_CONTRAST_CHANGE, MAX_BRIGHTNESS_SHIFT = 0.1, 0.05


def augment_draws(seed: int, epoch: int, position: int) -> torch.Tensor:
    """The sample's augmentation as AUGMENT_DRAWS numbers in [0, 1): a pure function of (seed, epoch, position)."""
    return torch.rand(AUGMENT_DRAWS, generator=sample_generator(seed, epoch, position))


def affine_sampling_grid(draws: torch.Tensor, size: int) -> torch.Tensor:
    """B x size x size x 2 grid_sample coordinates of the small rotation, scale and shift each row of draws asks for.

    The same mapping torchvision's `affine` builds for one image (inverse matrix about the image centre, pixel
    centres at half-integers, shifts rounded to whole pixels), for a whole batch at once on any device.
    """
    draws = draws.to(torch.float64)
    angle = torch.deg2rad((draws[:, 0] * 2 - 1) * MAX_ANGLE_DEGREES)
    scale = 1.0 + (draws[:, 1] * 2 - 1) * MAX_SCALE_CHANGE
    shift_x = torch.round((draws[:, 2] * 2 - 1) * MAX_SHIFT_FRACTION * size)
    shift_y = torch.round((draws[:, 3] * 2 - 1) * MAX_SHIFT_FRACTION * size)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # output pixel (x, y), centred coordinates -> the input pixel it samples: inverse rotation-scale, then unshift;
    # divided by half the size for grid_sample's [-1, 1]
    half = 0.5 * size
    rows = [(coefficient.to(torch.float32) / half)[:, None, None] for coefficient in
            (cos, sin, -cos * shift_x - sin * shift_y, -sin, cos, sin * shift_x - cos * shift_y)]
    centres = torch.arange(size, dtype=torch.float32, device=draws.device) - (half - 0.5)
    pixel_y, pixel_x = torch.meshgrid(centres, centres, indexing="ij")
    # multiply-adds, not a matrix product: the trainer allows TF32 matmuls, whose 10-bit mantissa would move pixels
    grid_x = rows[0] * pixel_x + rows[1] * pixel_y + rows[2]
    grid_y = rows[3] * pixel_x + rows[4] * pixel_y + rows[5]
    return torch.stack([grid_x, grid_y], dim=-1)


def augment_batch(images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Small affine and intensity jitter of B x 1 x H x W images in [0, 1], one row of draws per image. No
    horizontal flip: zones are lateralised (right vs left lung)."""
    size = images.shape[-1]
    if images.shape[-2] != size:
        raise ValueError(f"augmentation expects square images, got {tuple(images.shape[-2:])}")
    grid = affine_sampling_grid(draws.to(images.device), size)
    moved = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    draws = draws.to(images.device, torch.float32)[:, :, None, None]
    contrast = 1.0 + (draws[:, 4:5] * 2 - 1) * MAX_CONTRAST_CHANGE
    brightness = (draws[:, 5:6] * 2 - 1) * MAX_BRIGHTNESS_SHIFT
    return (moved * contrast + brightness).clamp_(0.0, 1.0)


def model_input(pixels: torch.Tensor, normalization: str, draws: torch.Tensor | None) -> torch.Tensor:
    """uint8 B x 1 x H x W -> normalised float32, augmented when draws (B x AUGMENT_DRAWS) are given. Runs where
    the pixels are: in a loader worker on the CPU, or on the GPU after a uint8 copy (data.gpu_augment)."""
    images = pixels.float().div_(255.0)
    if draws is not None:
        images = augment_batch(images, draws)
    mean, std = NORMALIZATION[normalization]
    return images.sub_(mean).div_(std)


def to_model_input(pixels: torch.Tensor, normalization: str, generator: torch.Generator | None) -> torch.Tensor:
    """One uint8 1 x H x W image -> normalised float32, augmented with the generator's draws when one is given."""
    draws = None if generator is None else torch.rand(AUGMENT_DRAWS, generator=generator)[None]
    return model_input(pixels[None], normalization, draws)[0]


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, epoch, sample position): resume-exact, layout-free."""
    generator = torch.Generator()
    generator.manual_seed(((seed * 1_000_003 + epoch) * 2_147_483_647 + position) % (2**63 - 1))
    return generator
