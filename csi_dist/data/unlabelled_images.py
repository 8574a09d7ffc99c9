"""The unlabelled image files `predict` reads, as a DataLoader dataset: each file through training's data path.

The shard writer's image path (`radiographs.encode_image_file`: load_grayscale, resize to the stored image size, 8-bit
PNG/JPEG/npy as stored) then the reader's (`transforms.decode_image` to the model input size, `to_model_input`, no
augmentation). A module of its own, so that DataLoader workers (csi_dist.data.workers) import its classes by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from csi_dist.data.radiographs import DEFAULT_JPEG_QUALITY, ImageError, encode_image_file
from csi_dist.data.transforms import DecodeError, decode_image, to_model_input


@dataclass(frozen=True)
class InputImage:
    """One image to predict; `index` is its position in the input (the output order)."""

    index: int
    file_id: str
    path: Path


@dataclass(frozen=True)
class ImagePipeline:
    """The preprocessing of training's data path: the writer's stored size and format, the reader's input size."""

    stored_size: int
    image_format: str
    input_size: int
    normalization: str


def model_input(path: Path, pipeline: ImagePipeline) -> torch.Tensor:
    """1 x size x size float tensor of one image file, exactly as training and evaluate see it (no augmentation).
    Raises ImageError or DecodeError."""
    stored = encode_image_file(path, pipeline.stored_size, pipeline.image_format, DEFAULT_JPEG_QUALITY)
    return to_model_input(decode_image(stored, pipeline.image_format, pipeline.input_size), pipeline.normalization,
                          None)


class ImageFiles(Dataset):
    """One rank's images, decoded in DataLoader workers; an unreadable file gives its reason instead of pixels."""

    def __init__(self, images: list[InputImage], pipeline: ImagePipeline):
        self.images = images
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        image = self.images[position]
        try:
            return image.index, model_input(image.path, self.pipeline), None
        except (ImageError, DecodeError) as error:
            return image.index, None, f"{type(error).__name__}: {error}"


def collate_images(samples: list[tuple]) -> dict:
    readable = [(index, pixels) for index, pixels, _ in samples if pixels is not None]
    return {"index": [index for index, _ in readable],
            "image": torch.stack([pixels for _, pixels in readable]) if readable else None,
            "failed": [(index, reason) for index, pixels, reason in samples if pixels is None]}
