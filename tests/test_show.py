"""csi-shards show: the grid's tiles are the reader's samples (augmented or not), labels stay put, bad input exits 2."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from csi_dist.data.radiographs import load_grayscale, resize_square
from csi_dist.data.labels import read_label_csv
from csi_dist.data.phantom import generate_phantom
from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
from csi_dist.data.shards.writer import write_demo
from csi_dist.shards import main
from csi_dist.data.shards.show import csv_tiles, grid_layout, shard_tiles, title_height, zone_anchors
from csi_dist.core.domain import ZONE_NAMES

SIZE = 64
N = 4
TILE = 128


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 phantom images at 64 px in shards (17 train)."""
    out = tmp_path_factory.mktemp("show") / "shards"
    write_demo(out, n_images=24, image_size=SIZE, seed=3, workers=1)
    return out


def reader_images(shards, augment: bool, seed: int = 42) -> tuple[list[np.ndarray], dict]:
    """The first N train samples as the training reader gives them, normalisation ("medical") undone, 0-255."""
    settings = LoaderSettings(batch_size=N, image_size=SIZE, augment=augment, seed=seed)
    batch = next(iter(build_loader(open_split(shards, "train"), settings, epoch=0, rank=0, world_size=1)))
    return [(image[0].numpy() * 0.5 + 0.5) * 255.0 for image in batch["image"]], batch


def grid_tile(path, layout, index: int, size: int) -> np.ndarray:
    """Tile `index`'s image region of a grid PNG, in grey, scaled back to size x size."""
    grid = Image.open(path).convert("L")
    region = grid.crop(layout.image_boxes[index]).resize((size, size), Image.Resampling.BOX)
    return np.asarray(region, dtype=np.float64)


def layout_of(png: Path, count: int, tile_px: int):
    """The grid layout of a written PNG: its heading is as many lines as the heading and legend needed."""
    extra_height = Image.open(png).size[1] - grid_layout(count, tile_px, heading_lines=0).size[1]
    assert extra_height % title_height(tile_px) == 0
    return grid_layout(count, tile_px, heading_lines=extra_height // title_height(tile_px))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def show(shards, out, *extra: str) -> int:
    return main(["show", str(shards), "--n", str(N), "--tile", str(TILE), "--out", str(out), *extra])


def test_grid_holds_the_reader_samples(shards, tmp_path):
    out = tmp_path / "grid.png"
    assert show(shards, out) == 0
    layout = layout_of(out, N, TILE)
    columns, rows = 2, 2
    assert Image.open(out).size == layout.size
    assert columns * TILE < layout.size[0] < (columns + 1) * TILE and rows * TILE < layout.size[1] < (rows + 1) * TILE
    images, _ = reader_images(shards, augment=False)
    for index in range(N):
        tile = grid_tile(out, layout, index, SIZE)
        matches = [correlation(tile, image) for image in images]
        errors = [np.abs(tile - image).mean() for image in images]
        others = [position for position in range(N) if position != index]
        # The drawn grades cover a little of each tile; the sample itself is still unmistakable.
        assert matches[index] > 0.9 and matches[index] > max(matches[other] for other in others) + 0.05
        assert errors[index] < 0.5 * min(errors[other] for other in others)


def test_augment_changes_pixels_not_labels(shards, tmp_path):
    plain, augmented = tmp_path / "plain.png", tmp_path / "augmented.png"
    assert show(shards, plain, "--seed", "7") == 0
    assert show(shards, augmented, "--seed", "7", "--augment") == 0
    layout, augmented_layout = layout_of(plain, N, TILE), layout_of(augmented, N, TILE)  # headings differ
    plain_grid, augmented_grid = (np.asarray(Image.open(path).convert("RGB")) for path in (plain, augmented))

    def crops(box, other_box):
        (left, top, right, bottom), (other_left, other_top, other_right, other_bottom) = box, other_box
        return (plain_grid[top:bottom, left:right].astype(int),
                augmented_grid[other_top:other_bottom, other_left:other_right].astype(int))

    for index in range(N):
        plain_title, augmented_title = crops(layout.title_boxes[index], augmented_layout.title_boxes[index])
        assert np.array_equal(plain_title, augmented_title)
        plain_image, augmented_image = crops(layout.image_boxes[index], augmented_layout.image_boxes[index])
        assert np.abs(plain_image - augmented_image).mean() > 2.0
    # The augmented tiles are the augmented samples the training reader gives, not the plain ones.
    augmented_images, batch = reader_images(shards, augment=True, seed=7)
    plain_images, _ = reader_images(shards, augment=False)
    for index in range(N):
        tile = grid_tile(augmented, augmented_layout, index, SIZE)
        assert np.abs(tile - augmented_images[index]).mean() < np.abs(tile - plain_images[index]).mean()
    # Same FileIDs and grades as drawn, equal to what the reader labels them.
    plain_tiles = shard_tiles(shards, "train", N, seed=7)
    augmented_tiles = shard_tiles(shards, "train", N, seed=7, augment=True)
    assert [tile.file_id for tile in plain_tiles] == [tile.file_id for tile in augmented_tiles] == batch["file_id"]
    assert [tile.zones for tile in plain_tiles] == [tile.zones for tile in augmented_tiles] == batch["zones"].tolist()
    assert not np.array_equal(plain_tiles[0].pixels, augmented_tiles[0].pixels)


def test_csv_variant_skips_a_corrupt_image(tmp_path, caplog):
    csv_path = generate_phantom(tmp_path / "raw", 6, image_size=48, seed=2, workers=1)
    labels = read_label_csv(csv_path)
    file_ids = labels["FileID"].tolist()
    images_dir = csv_path.parent / "images"
    (images_dir / f"{file_ids[0]}.png").write_bytes(b"not a png at all")
    out = tmp_path / "csv_grid.png"
    with caplog.at_level(logging.INFO):
        assert main(["show", "--csv", str(csv_path), "--images", str(images_dir), "--n", "3", "--size", "32",
                     "--tile", "96", "--out", str(out)]) == 0
    layout = layout_of(out, 3, 96)
    assert Image.open(out).size == layout.size
    assert "skipped 1 unreadable image(s) of 4 row(s) read (CorruptImageError 1)" in caplog.text
    assert file_ids[0] in caplog.text
    # Tile 0 is the second row's image, decoded and resized as the shard writer does.
    expected = [resize_square(load_grayscale(images_dir / f"{file_id}.png"), 32).astype(np.float64)
                for file_id in file_ids[1:4]]
    tile = grid_tile(out, layout, 0, 32)
    assert np.abs(tile - expected[0]).mean() < 0.5 * min(np.abs(tile - other).mean() for other in expected[1:])
    tiles, skipped = csv_tiles(csv_path, images_dir, 3, image_size=32)
    assert skipped == 1 and [tile.file_id for tile in tiles] == file_ids[1:4]
    assert [tile.zones for tile in tiles] == labels.loc[1:3, list(ZONE_NAMES)].to_numpy().tolist()


def test_bad_input_exits_2_without_traceback(shards, tmp_path, caplog, capsys):
    out = tmp_path / "never.png"
    with caplog.at_level(logging.INFO):
        assert main(["show", str(tmp_path / "no_shards_here"), "--out", str(out)]) == 2
        assert "no manifest.json in" in caplog.text
        assert main(["show", "--out", str(out)]) == 2
        assert "give a shard directory, or --csv and --images" in caplog.text
        assert main(["show", str(shards), "--n", "0", "--out", str(out)]) == 2
    assert not out.exists()
    assert "Traceback" not in capsys.readouterr().err + caplog.text


def test_zone_labels_sit_in_radiological_convention():
    """Patient right on the image's left, superior zones at the top."""
    anchors = zone_anchors(200)
    for level in ("sup", "mid", "inf"):
        assert anchors[f"right_{level}"][0] < 100 < anchors[f"left_{level}"][0]
    for side in ("right", "left"):
        assert anchors[f"{side}_sup"][1] < anchors[f"{side}_mid"][1] < anchors[f"{side}_inf"][1]


def test_a_small_grid_draws_every_title_and_the_legend_whole(tmp_path):
    """At --tile 128 titles were cut ("#1 2020010...") and the legend ended in "..." on a narrow grid."""
    from csi_dist.data.shards.show import LEGEND, Tile, render_grid
    pixels = np.full((32, 32), 128, dtype=np.uint8)
    tiles = [Tile("20200101.00", [0, 1, 2, 3, 4, 0], pixels), Tile("20200101.01", [4] * 6, pixels * 0, "decode failed")]
    heading = "phantom_shards | train | first 2 | 32 px | augment seed 42"
    layout = render_grid(tiles, tmp_path / "grid.png", tile_px=128, heading=heading)
    assert Image.open(tmp_path / "grid.png").size == layout.size
    assert "#0 20200101.00" in layout.texts and "#1 20200101.01" in layout.texts
    assert not any(text.endswith("...") for text in layout.texts), layout.texts
    drawn = " ".join(layout.texts)
    assert heading in drawn and LEGEND in drawn and "decode failed" in drawn
