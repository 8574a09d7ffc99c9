"""Per-sample image transforms: grayscale decode, resize, train-time augmentation and normalisation."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

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


def augment(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Small affine and intensity jitter. No horizontal flip: zones are lateralised (right vs left lung)."""
    draw = torch.rand(6, generator=generator).tolist()
    size = image.shape[-1]
    angle = (draw[0] * 2 - 1) * 7.0
    scale = 1.0 + (draw[1] * 2 - 1) * 0.08
    translate = [round((draw[2] * 2 - 1) * 0.04 * size), round((draw[3] * 2 - 1) * 0.04 * size)]
    image = TF.affine(image, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                      interpolation=TF.InterpolationMode.BILINEAR)
    contrast = 1.0 + (draw[4] * 2 - 1) * 0.1
    brightness = (draw[5] * 2 - 1) * 0.05
    return (image * contrast + brightness).clamp(0.0, 1.0)


def to_model_input(pixels: torch.Tensor, normalization: str, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 1 x H x W -> normalised float32, augmented when a generator is given."""
    image = pixels.float().div_(255.0)
    if generator is not None:
        image = augment(image, generator)
    mean, std = NORMALIZATION[normalization]
    return image.sub_(mean).div_(std)


def sample_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """Augmentation randomness as a pure function of (seed, epoch, sample position): resume-exact, layout-free."""
    generator = torch.Generator()
    generator.manual_seed(((seed * 1_000_003 + epoch) * 2_147_483_647 + position) % (2**63 - 1))
    return generator
