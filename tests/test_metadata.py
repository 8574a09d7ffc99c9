"""The label CSV's extra columns (site, sex, ...) reach each sample's label record, the manifest and the predictions."""
from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from csi_dist.data.shards.format import MANIFEST_NAME, SPLIT_FILE_NAME, SPLIT_NAMES
from csi_dist.data.shards.verify import verify_shards
from csi_dist.data.shards.writer import write_shards
from data_helpers import HEADER, gradient_image, label_row, write_csv, write_png
from shard_factory import write_shards as factory_shards

SITES = ["A", "B", "", "A", "C", "B", "A", "", "B", "A", "C", "A", "B", "A"]
SEXES = ["F", "M", "M", "F", "", "F", "M", "F", "M", "nan", "F", "M", "F", "F"]


@pytest.fixture(scope="module")
def metadata_shards(tmp_path_factory) -> Path:
    """14 images of 7 patients, with extra columns site, sex and "age band" (some cells empty)."""
    root = tmp_path_factory.mktemp("metadata")
    (root / "images").mkdir()
    rows = []
    for index, (site, sex) in enumerate(zip(SITES, SEXES)):
        file_id = f"img{index:03d}"
        write_png(root / "images" / f"{file_id}.png", gradient_image(20, 20))
        rows.append(label_row(file_id, (0, 1, 2, 3, None, index % 4), "", f"P{index // 2}", site, sex,
                              f"{40 + 10 * (index % 3)}-{49 + 10 * (index % 3)}"))
    write_csv(root / "labels.csv", rows, header=[*HEADER, "patient_id", "site", "sex", "age band"])
    write_shards(root / "labels.csv", root / "images", root / "shards", image_size=16, workers=1,
                 split_fractions=(0.5, 0.25, 0.25), samples_per_shard=3)
    return root


def csv_cells(root: Path) -> dict[str, dict[str, str | None]]:
    """{FileID: {extra column: cell or None}}, read with the standard library (empty and 'nan' are missing)."""
    with (root / "labels.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter=";"))
    return {row["FileID"]: {name: (row[name] if row[name] not in ("", "nan") else None)
                            for name in ("site", "sex", "age band")} for row in rows}


def test_extra_columns_reach_every_label_record_and_the_manifest_counts_them_per_split(metadata_shards):
    shards = metadata_shards / "shards"
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    cells = csv_cells(metadata_shards)
    assert manifest["metadata_columns"] == ["site", "sex", "age band"]
    with (shards / SPLIT_FILE_NAME).open(encoding="utf-8") as handle:
        split_of = {row["FileID"]: row["split"] for row in csv.DictReader(handle, delimiter=";")}
    seen = {}
    for split in SPLIT_NAMES:
        for entry in manifest["splits"][split]["shards"]:
            with tarfile.open(shards / entry["path"]) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        label = json.loads(tar.extractfile(member).read())
                        seen[label["file_id"]] = label["metadata"]
        ids = [file_id for file_id, name in split_of.items() if name == split]
        for column in ("site", "sex", "age band"):
            values = [cells[file_id][column] for file_id in ids]
            expected = {"values": dict(sorted(Counter(value for value in values if value is not None).items())),
                        "missing": values.count(None)}
            assert manifest["splits"][split]["metadata"][column] == expected, (split, column)
    assert seen == cells  # every image, its own cells, empty ones as null
    assert manifest["splits"]["train"]["metadata"]["site"]["missing"] + sum(
        split["metadata"]["site"]["missing"] for name, split in manifest["splits"].items() if name != "train") == 2
    assert verify_shards(shards).all_intact


def test_the_reader_hands_each_samples_metadata_and_old_shards_have_none(metadata_shards, tmp_path):
    from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
    settings = LoaderSettings(batch_size=4, image_size=16)
    cells = csv_cells(metadata_shards)
    batches = list(build_loader(open_split(metadata_shards / "shards", "train"), settings, epoch=0, rank=0,
                                world_size=1))
    pairs = [(file_id, metadata) for batch in batches for file_id, metadata, padding
             in zip(batch["file_id"], batch["metadata"], batch["is_padding"].tolist()) if not padding]
    assert pairs and all(metadata == cells[file_id] for file_id, metadata in pairs)
    old = factory_shards(tmp_path / "old", {"test": [3]})
    batch = next(iter(build_loader(open_split(old, "test"), settings, epoch=0, rank=0, world_size=1)))
    assert batch["metadata"][:3] == [{}, {}, {}]


def test_predictions_carry_the_metadata_in_manifest_order(metadata_shards):
    import torch

    from csi_dist.api import predict
    from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split

    class Constant(torch.nn.Module):
        def forward(self, images):
            return torch.zeros(images.shape[0], 6, 5) + images.mean() * 0

    shards = metadata_shards / "shards"
    cells = csv_cells(metadata_shards)
    predictions = predict(Constant(), build_loader(open_split(shards, "train"), LoaderSettings(batch_size=4,
                          image_size=16), epoch=0, rank=0, world_size=1), device="cpu")
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    assert len(predictions.file_ids) == manifest["splits"]["train"]["count"]
    assert list(predictions.metadata) == ["site", "sex", "age band"]
    for column, values in predictions.metadata.items():
        assert values == [cells[file_id][column] for file_id in predictions.file_ids]
