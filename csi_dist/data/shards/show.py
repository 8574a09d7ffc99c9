"""`csi-shards show`: a PNG grid of samples as the model sees them, each zone's grade written where that zone is.

From shards the samples come through the training reader (`build_loader`: decode, resize, with `--augment` the
training augmentation of `transforms.augment_batch`, normalisation), and the normalisation is undone for display. From a
label CSV and its images (before sharding) they go through the shard writer's decode and resize, then the same
`to_model_input`. The first N samples of the split in shard order (of the CSV in file order) are drawn.

Zone labels sit at the centre of each zone of a frontal radiograph in radiological convention: the patient's right
lung on the image's LEFT, superior zones at the top (the geometry of `phantom.zone_boxes`, which is also what the
NIfTI reader's "patient's right on the image's left, superior at the top" produces).
"""
from __future__ import annotations

import argparse
import collections
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from csi_dist.data.radiographs import (ImageError, MissingImageError, build_image_index, image_for, load_grayscale,
                                       resize_square)
from csi_dist.data.labels import LabelError, read_label_csv
from csi_dist.data.phantom import zone_boxes
from csi_dist.data.shards.reader import LoaderSettings, ShardError, build_loader, open_split
from csi_dist.data.transforms import NORMALIZATION, sample_generator, to_model_input
from csi_dist.core.domain import FILE_ID_COLUMN, UNKNOWN_CLASS, ZONE_NAMES
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR

logger = logging.getLogger(__name__)

DEFAULT_SHOW_COUNT = 16
DEFAULT_TILE_PX = 256
DEFAULT_CSV_SIZE = 512
DEFAULT_SEED = 42  # LoaderSettings' and the config's training seed
MARGIN = 6
BACKGROUND = (24, 24, 24)
TITLE_BACKGROUND = (48, 48, 56)
TITLE_COLOR = (235, 235, 235)
MIN_TEXT_PX = 8  # a title is drawn smaller, down to this size, rather than cut
FAILED_COLOR = (255, 110, 110)
# Grade colours (0 normal .. 3 severe, then unknown), drawn with a black outline so they read on any grey.
GRADE_COLORS = ((110, 230, 110), (250, 230, 70), (255, 150, 40), (255, 60, 60), (90, 200, 255))
UNKNOWN_TEXT = "?"
LEGEND = "grades drawn at their zones: patient's right on the image's left, ? = unknown"


class ShowError(ValueError):
    """The grid cannot be drawn as asked (bad options, no samples)."""


@dataclass
class Tile:
    """One sample as drawn: its display pixels (uint8 H x W, what the model gets with the normalisation undone)."""

    file_id: str
    zones: list[int]
    pixels: np.ndarray
    note: str = ""  # shown in the title, e.g. "decode failed"


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a grid: PNG size and, per tile, its title strip and image box (left, top, right, bottom)."""

    size: tuple[int, int]
    columns: int
    title_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    image_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # every line of text render_grid drew, in order


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def title_height(tile_px: int) -> int:
    return max(14, tile_px // 12) + 6


def grid_layout(count: int, tile_px: int = DEFAULT_TILE_PX, heading_lines: int = 2) -> GridLayout:
    """A near-square grid of `count` tiles of tile_px x tile_px under `heading_lines` lines of heading (the heading
    and the legend, wrapped to the grid's width), each tile with a title strip."""
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    title = title_height(tile_px)
    heading = heading_lines * title
    cell_width, cell_height = tile_px + MARGIN, title + tile_px + MARGIN
    size = (MARGIN + columns * cell_width, heading + MARGIN + rows * cell_height)
    title_boxes, image_boxes = [], []
    for index in range(count):
        left = MARGIN + (index % columns) * cell_width
        top = heading + MARGIN + (index // columns) * cell_height
        title_boxes.append((left, top, left + tile_px, top + title))
        image_boxes.append((left, top + title, left + tile_px, top + title + tile_px))
    return GridLayout(size, columns, title_boxes, image_boxes)


def zone_anchors(tile_px: int) -> dict[str, tuple[int, int]]:
    """(x, y) of the centre of each zone in a tile: patient right on the image's left, superior zones at the top."""
    return {zone: ((left + right) // 2, (top + bottom) // 2)
            for zone, (top, bottom, left, right) in zone_boxes(tile_px).items()}


def grade_text(grade: int) -> str:
    return UNKNOWN_TEXT if int(grade) == UNKNOWN_CLASS else str(int(grade))


def to_display(image: torch.Tensor, normalization: str = "medical") -> np.ndarray:
    """Model input (1 x H x W, normalised float) -> uint8 H x W: the inverse of `to_model_input`'s normalisation."""
    mean, std = NORMALIZATION[normalization]
    unit = image.detach().float().reshape(image.shape[-2:]) * std + mean
    return (unit.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels (the last resort: see `_shrunk_font` and `_wrapped`)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _shrunk_font(draw: ImageDraw.ImageDraw, text: str, width: int, largest_px: int):
    """The largest font, from `largest_px` down to MIN_TEXT_PX, that fits `text` on one line of `width` pixels (the
    smallest when none does)."""
    for size in range(largest_px, MIN_TEXT_PX - 1, -1):
        font = _font(size)
        if draw.textlength(text, font=font) <= width:
            return font
    return _font(MIN_TEXT_PX)


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels, broken between words (a word too long alone is cut)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, font, width))
    return lines or [""]


def render_grid(tiles: list[Tile], out: str | Path, *, tile_px: int = DEFAULT_TILE_PX, heading: str = "") -> GridLayout:
    """Draw the tiles (image scaled to tile_px, grades at their zones, "#i FileID" above) into the PNG `out`, under
    `heading` and the legend, wrapped to the grid's width; a title too long for its tile is drawn smaller."""
    if not tiles:
        raise ShowError("no samples to draw")
    title_px = title_height(tile_px)
    title_font, grade_font = _font(title_px - 6), _font(max(12, tile_px // 9))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = grid_layout(len(tiles), tile_px).size[0] - 2 * MARGIN
    heading_lines = [line for text in (heading, LEGEND) for line in _wrapped(measure, text, title_font, text_width)]
    layout = grid_layout(len(tiles), tile_px, len(heading_lines))
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    stroke = max(1, tile_px // 64)
    layout.texts.extend(heading_lines)
    for line, text in enumerate(heading_lines):
        draw.text((MARGIN, line * title_px + title_px // 2 + MARGIN // 2), text, font=title_font, fill=TITLE_COLOR,
                  anchor="lm")
    anchors = zone_anchors(tile_px)
    for index, (tile, title_box, image_box) in enumerate(zip(tiles, layout.title_boxes, layout.image_boxes)):
        pixels = Image.fromarray(np.ascontiguousarray(tile.pixels, dtype=np.uint8))
        # Upscaling keeps each model pixel visible (nearest); shrinking a large image averages (Lanczos).
        resample = Image.Resampling.NEAREST if tile_px >= max(pixels.size) else Image.Resampling.LANCZOS
        canvas.paste(pixels.resize((tile_px, tile_px), resample).convert("RGB"), image_box[:2])
        draw.rectangle(title_box, fill=TITLE_BACKGROUND)
        title = f"#{index} {tile.file_id}"
        font = _shrunk_font(draw, title, tile_px - 8, title_px - 6)
        layout.texts.append(_fit(draw, title, font, tile_px - 8))
        draw.text((title_box[0] + 4, (title_box[1] + title_box[3]) // 2), layout.texts[-1],
                  font=font, fill=FAILED_COLOR if tile.note else TITLE_COLOR, anchor="lm")
        if tile.note:  # on the tile itself (black when the image failed), where there is room for it
            note_lines = _wrapped(draw, tile.note, title_font, tile_px - 8)
            layout.texts.extend(note_lines)
            draw.multiline_text(((image_box[0] + image_box[2]) // 2, (image_box[1] + image_box[3]) // 2),
                                "\n".join(note_lines), font=title_font, fill=FAILED_COLOR, anchor="mm",
                                align="center")
            continue
        for zone, grade in zip(ZONE_NAMES, tile.zones):
            x, y = anchors[zone]
            draw.text((image_box[0] + x, image_box[1] + y), grade_text(grade), font=grade_font, anchor="mm",
                      fill=GRADE_COLORS[min(int(grade), UNKNOWN_CLASS)], stroke_width=stroke, stroke_fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return layout


def shard_tiles(shard_dir: str | Path, split: str = "train", count: int = DEFAULT_SHOW_COUNT, *,
                augment: bool = False, seed: int = DEFAULT_SEED, image_size: int | None = None,
                normalization: str = "medical") -> list[Tile]:
    """The first `count` samples of a split through the training reader (epoch 0, one rank, shard order)."""
    shard_set = open_split(shard_dir, split)
    if shard_set.num_samples == 0:
        raise ShowError(f"{shard_dir}: split {split!r} has no samples")
    count = min(count, shard_set.num_samples)
    settings = LoaderSettings(batch_size=count, image_size=image_size or shard_set.stored_image_size,
                              normalization=normalization, augment=augment, seed=seed)
    batch = next(iter(build_loader(shard_set, settings, epoch=0, rank=0, world_size=1)))
    tiles = [Tile(file_id, zones, to_display(image, normalization), "decode failed" if failed else "")
             for file_id, zones, image, failed in zip(batch["file_id"], batch["zones"].tolist(), batch["image"],
                                                      batch["decode_failed"].tolist())]
    failed = sum(bool(tile.note) for tile in tiles)
    if failed:
        logger.warning("%d of %d sample(s) could not be decoded; drawn black and marked", failed, len(tiles))
    return tiles


def csv_tiles(csv_path: str | Path, images_dir: str | Path, count: int = DEFAULT_SHOW_COUNT, *,
              image_size: int = DEFAULT_CSV_SIZE, augment: bool = False, seed: int = DEFAULT_SEED,
              normalization: str = "medical") -> tuple[list[Tile], int]:
    """The first `count` readable images of a label CSV (file order), decoded and resized as the shard writer does,
    then through `to_model_input`. Missing and unreadable images are skipped and logged. Returns (tiles, skipped)."""
    labels = read_label_csv(csv_path)
    index = build_image_index(images_dir)
    tiles: list[Tile] = []
    reasons: collections.Counter = collections.Counter()
    for _, row in labels.iterrows():
        if len(tiles) >= count:
            break
        file_id = str(row[FILE_ID_COLUMN])
        path = image_for(index, file_id)
        try:
            if path is None:
                raise MissingImageError(Path(images_dir) / file_id, "no image file for this FileID")
            pixels = resize_square(load_grayscale(path), image_size)
        except ImageError as error:
            reasons[type(error).__name__] += 1
            logger.warning("skipping FileID %s: %s", file_id, error)
            continue
        generator = sample_generator(seed, 0, len(tiles)) if augment else None
        image = to_model_input(torch.from_numpy(pixels.copy()).unsqueeze(0), normalization, generator)
        tiles.append(Tile(file_id, [int(row[zone]) for zone in ZONE_NAMES], to_display(image, normalization)))
    skipped = sum(reasons.values())
    if skipped:
        logger.warning("skipped %d unreadable image(s) of %d row(s) read (%s)", skipped, len(tiles) + skipped,
                       ", ".join(f"{reason} {number}" for reason, number in sorted(reasons.items())))
    if not tiles:
        raise ShowError(f"{csv_path}: no readable image among its {len(labels)} row(s) in {images_dir}")
    return tiles, skipped


def run_show(args: argparse.Namespace) -> int:
    """`csi-shards show`: 0 when the grid is written, 2 (with a logged message, no traceback) on bad input."""
    try:
        if args.n < 1 or args.tile < 16 or (args.size is not None and args.size < 1):
            raise ShowError(f"--n {args.n}, --tile {args.tile}, --size {args.size}: expected n >= 1, tile >= 16, "
                            f"size >= 1")
        from_csv = args.csv is not None or args.images is not None
        if from_csv == (args.directory is not None) or from_csv and (args.csv is None or args.images is None):
            raise ShowError("give a shard directory, or --csv and --images (not both)")
        augmented = f" | augment seed {args.seed}" if args.augment else ""
        if from_csv:
            size = args.size or DEFAULT_CSV_SIZE
            tiles, skipped = csv_tiles(args.csv, args.images, args.n, image_size=size, augment=args.augment,
                                       seed=args.seed)
            heading = (f"{args.csv.name} | first {len(tiles)} readable | {size} px{augmented}"
                       + (f" | {skipped} skipped" if skipped else ""))
        else:
            tiles = shard_tiles(args.directory, args.split, args.n, augment=args.augment, seed=args.seed,
                                image_size=args.size)
            heading = (f"{args.directory.name or args.directory} | {args.split} | first {len(tiles)} | "
                       f"{tiles[0].pixels.shape[0]} px{augmented}")
        render_grid(tiles, args.out, tile_px=args.tile, heading=heading)
    except (ShowError, ShardError, LabelError, ImageError, OSError) as error:
        logger.error("%s", error)
        return EXIT_CONFIG_ERROR
    logger.info("wrote %s: %d sample(s)", args.out, len(tiles))
    return 0
