"""csi-shards: manifest and tar contents agree, bad inputs are skipped or rejected, verify finds damage."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile

import pytest

from csi_dist.data.labels import read_label_csv
from csi_dist.data.phantom import generate_phantom
from csi_dist.data.shards.format import MANIFEST_NAME, SPLIT_FILE_NAME, SPLIT_NAMES
from csi_dist.data.shards.verify import verify_shards
from csi_dist.data.shards.writer import ShardWriteError, sample_keys, write_shards
from csi_dist.shards import main
from csi_dist.core.domain import ZONE_NAMES
from data_helpers import gradient_image, label_row, write_csv, write_png
from shard_factory import write_shards as factory_shards


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """40 phantom images at 48 px (labels.csv + images/)."""
    return generate_phantom(tmp_path_factory.mktemp("phantom"), 40, image_size=48, seed=1, workers=1)


def tar_samples(path):
    """{key: {extension: bytes}} of one tar, read with the standard library."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, extension = member.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return samples


def test_manifest_matches_tar_contents(phantom, tmp_path):
    out = tmp_path / "shards"
    manifest = write_shards(phantom, phantom.parent / "images", out, image_size=32, samples_per_shard=8, workers=1)
    labels = read_label_csv(phantom).set_index("FileID")
    seen = set()
    for name in SPLIT_NAMES:
        split = manifest["splits"][name]
        histogram = {zone: [0] * 5 for zone in ZONE_NAMES}
        for shard in split["shards"]:
            path = out / shard["path"]
            assert shard["bytes"] == path.stat().st_size
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            samples = tar_samples(path)
            assert shard["count"] == len(samples) <= 8
            for key, members in samples.items():
                assert set(members) == {"png", "json"}
                label = json.loads(members["json"])
                assert list(label) == ["file_id", "zones", "csi", "ahf", "patient_id"]
                row = labels.loc[label["file_id"]]
                assert key == label["file_id"] and label["zones"] == row[list(ZONE_NAMES)].tolist()
                assert label["ahf"] == int(row["ahf"]) and label["patient_id"] == row["patient_id"]
                for zone, grade in zip(ZONE_NAMES, label["zones"]):
                    histogram[zone][grade] += 1
                seen.add(label["file_id"])
        assert split["count"] == sum(shard["count"] for shard in split["shards"])
        assert split["label_histogram"] == histogram
    assert seen == set(labels.index) and manifest["skipped"]["count"] == 0
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    assert (out / SPLIT_FILE_NAME).read_text().startswith("FileID;patient_id;split\n")
    assert verify_shards(out).all_intact


def test_images_decode_with_webdataset(phantom, tmp_path):
    import numpy as np
    import webdataset

    out = tmp_path / "shards"
    manifest = write_shards(phantom, phantom.parent / "images", out, image_size=24, image_format="jpg", workers=1)
    url = str(out / manifest["splits"]["train"]["shards"][0]["path"])
    sample = next(iter(webdataset.WebDataset(url, shardshuffle=False).decode("l8")))
    assert np.asarray(sample["jpg"]).shape == (24, 24) and len(sample["json"]["zones"]) == 6


def test_output_is_deterministic_across_worker_counts(phantom, tmp_path):
    first = write_shards(phantom, phantom.parent / "images", tmp_path / "a", image_size=16, workers=1)
    second = write_shards(phantom, phantom.parent / "images", tmp_path / "b", image_size=16, workers=2)
    assert first["splits"] == second["splits"]
    assert (tmp_path / "a" / SPLIT_FILE_NAME).read_text() == (tmp_path / "b" / SPLIT_FILE_NAME).read_text()


def test_missing_and_corrupt_images_are_skipped_and_listed(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    for file_id in ("1", "2", "3", "4"):
        write_png(images / f"{file_id}.png", gradient_image())
    (images / "3.png").write_bytes((images / "3.png").read_bytes()[:60])  # truncated PNG
    (images / "4.png").unlink()
    csv_path = write_csv(tmp_path / "labels.csv", [label_row(file_id) for file_id in ("1", "2", "3", "4")])

    with caplog.at_level(logging.WARNING):
        manifest = write_shards(csv_path, images, tmp_path / "out", image_size=16, workers=1,
                                split_fractions=(1.0, 0.0, 0.0))
    skipped = manifest["skipped"]
    assert skipped["count"] == 2
    assert [(sample["file_id"], sample["row"]) for sample in skipped["samples"]] == [("3", 4), ("4", 5)]
    assert "CorruptImageError" in skipped["samples"][0]["reason"] and "3.png" in skipped["samples"][0]["reason"]
    assert "MissingImageError" in skipped["samples"][1]["reason"]
    assert manifest["splits"]["train"]["count"] == 2
    assert "skipped 2 sample(s)" in caplog.text
    # Empty splits are valid: count 0, no shards.
    assert manifest["splits"]["val"] == {"count": 0, "label_histogram": {zone: [0] * 5 for zone in ZONE_NAMES},
                                         "shards": []}

    with pytest.raises(ShardWriteError, match="--strict.*line 5 FileID 4"):
        write_shards(csv_path, images, tmp_path / "strict", image_size=16, workers=1, strict=True)
    (images / "4.png").write_bytes((images / "1.png").read_bytes())
    with pytest.raises(ShardWriteError, match="--strict.*line 4 FileID 3.*CorruptImageError"):
        write_shards(csv_path, images, tmp_path / "strict", image_size=16, workers=1, strict=True)
    assert not (tmp_path / "strict" / MANIFEST_NAME).exists()


def test_cli_bad_csv_exits_2_with_message(tmp_path, caplog):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1"), label_row("2", (0, 7, 0, 0, 0, 0))])
    (tmp_path / "images").mkdir()
    code = main(["write", "--csv", str(csv_path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "line 3, column left_sup" in caplog.text and "Traceback" not in caplog.text


def test_cli_names_every_bad_csv_row_in_one_run(tmp_path, caplog):
    rows = [label_row("1", (0, 9, 0, 0, 0, 0)), label_row("2"), label_row("3", csi="x"), label_row("4", ("a",) * 6)]
    csv_path = write_csv(tmp_path / "labels.csv", rows)
    (tmp_path / "images").mkdir()
    code = main(["write", "--csv", str(csv_path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "3 bad rows" in caplog.text
    for named in ("line 2, column left_sup", "line 4, column csi", "line 5, column right_sup"):
        assert named in caplog.text


def test_cli_checks_out_before_reading_the_csv(phantom, tmp_path, caplog):
    """An --out that already has shards is the error a user sees first, not the CSV's (fixed, then refused)."""
    common = ["--images", str(phantom.parent / "images"), "--size", "16", "--workers", "1",
              "--out", str(tmp_path / "a")]
    assert main(["write", "--csv", str(phantom), *common]) == 0
    bad_csv = write_csv(tmp_path / "bad.csv", [label_row("1", (0, 9, 0, 0, 0, 0))])
    caplog.clear()
    assert main(["write", "--csv", str(bad_csv), *common]) == 2
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [f"{tmp_path / 'a'}: already holds shards (manifest.json or */shard-*.tar); choose another --out "
                      f"or pass --overwrite"]


def test_cli_encoding_reads_excel_cp1252_csv_and_finds_images_of_text_ids(tmp_path, caplog):
    images = tmp_path / "images"
    images.mkdir()
    file_ids = ["20200101.00", "µ2"]
    for file_id in file_ids:
        write_png(images / f"{file_id}.png", gradient_image())
    csv_path = write_csv(tmp_path / "labels.csv", [label_row(file_id) for file_id in file_ids])
    csv_path.write_bytes(csv_path.read_text(encoding="utf-8").encode("cp1252"))
    common = ["write", "--csv", str(csv_path), "--images", str(images), "--size", "16", "--workers", "1",
              "--split-fractions", "1", "0", "0"]

    assert main([*common, "--out", str(tmp_path / "o"), "--encoding", "cp1252"]) == 0
    manifest = json.loads((tmp_path / "o" / MANIFEST_NAME).read_text())
    assert manifest["skipped"]["count"] == 0 and manifest["splits"]["train"]["count"] == 2
    assert main([*common, "--out", str(tmp_path / "p"), "--encoding", "utf-8"]) == 2
    assert f"{csv_path}: line 3" in caplog.text and "'utf-8'" in caplog.text and "Traceback" not in caplog.text


def test_cli_refuses_existing_output_and_reuses_split_file(phantom, tmp_path):
    common = ["--csv", str(phantom), "--images", str(phantom.parent / "images"), "--size", "16", "--workers", "1"]
    assert main(["write", *common, "--out", str(tmp_path / "a"), "--seed", "5"]) == 0
    assert main(["write", *common, "--out", str(tmp_path / "a")]) == 2
    assert main(["write", *common, "--out", str(tmp_path / "b"),
                 "--split-file", str(tmp_path / "a" / SPLIT_FILE_NAME)]) == 0
    assert (tmp_path / "a" / SPLIT_FILE_NAME).read_text() == (tmp_path / "b" / SPLIT_FILE_NAME).read_text()


def test_verify_reports_truncated_and_missing_shards(phantom, tmp_path, caplog):
    out = tmp_path / "shards"
    manifest = write_shards(phantom, phantom.parent / "images", out, image_size=16, samples_per_shard=10, workers=1)
    assert main(["verify", str(out)]) == 0
    train_shards = [shard["path"] for shard in manifest["splits"]["train"]["shards"]]
    truncated, missing = out / train_shards[0], out / train_shards[1]
    truncated.write_bytes(truncated.read_bytes()[:3000])
    missing.unlink()
    caplog.clear()
    assert main(["verify", str(out)]) == 1
    assert f"{train_shards[0]}: unusable: truncated: 3000 bytes" in caplog.text
    assert f"{train_shards[1]}: unusable: the shard file is missing" in caplog.text
    assert f"verdict: {out}: unusable: the train split(s) cannot be opened" in caplog.text


def test_verify_reports_modified_shard_and_names_the_damaged_sample(phantom, tmp_path):
    out = tmp_path / "shards"
    manifest = write_shards(phantom, phantom.parent / "images", out, image_size=16, workers=1)
    entry = manifest["splits"]["val"]["shards"][0]
    shard = out / entry["path"]
    with tarfile.open(shard) as archive:  # where the tar itself says the second sample's image lies
        image = next(member for member in archive if member.name.endswith(".png") and
                     member.name.startswith(entry["samples"][1]["key"] + "."))
    data = bytearray(shard.read_bytes())
    data[image.offset_data + image.size // 2] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    lines = [shard.line() for shard in verify_shards(out).shards if not shard.intact]
    assert len(lines) == 1 and lines[0].startswith(f"{entry['path']}: modified: sha256 differs from the manifest")
    assert (f"usable with 1 damaged sample(s), skipped when read: {entry['samples'][1]['key']} (member png fails its "
            f"checksum (damaged bytes))") in lines[0]


def reader_skips(shard_dir, split: str = "train") -> tuple[int, set[str]]:
    """(samples read, keys of the samples skipped) when the reader reads `split` once, as training does."""
    from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split

    loader = build_loader(open_split(shard_dir, split), LoaderSettings(batch_size=8, image_size=16), epoch=0, rank=0,
                          world_size=1)
    real = [(int(index), bool(bad)) for batch in loader
            for index, bad, padding in zip(batch["sample_index"], batch["decode_failed"], batch["is_padding"])
            if not padding]
    return len(real), {f"{split}-{index:05d}" for index, bad in real if bad}  # shard_factory's keys


def overwrite_600_bytes(shard, member_name: str, where: str, length: int = 600) -> None:
    """600 bytes of a shard overwritten, from the start of `member_name`'s tar header or of its data."""
    with tarfile.open(shard) as archive:
        member = archive.getmember(member_name)
    start = member.offset if where == "header" else member.offset_data
    data = bytearray(shard.read_bytes())
    data[start:start + length] = (bytes(range(200)) * 3)[:length]
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["tar header", "sample data", "tar header, manifest without sample index",
                                  "image bytes, manifest without sample index"])
def test_verify_verdict_on_600_overwritten_bytes_matches_what_the_reader_does(tmp_path, caplog, case):
    """The issue's shard: "sha256 differs", "0 damaged sample(s) (skipped when read): " and "2 samples, manifest says
    30" while the reader decoded all 30. Now one verdict per shard and one for the set, and the reader agrees."""
    root = factory_shards(tmp_path / "s", {"train": [30], "val": [5]}, sample_index="without" not in case)
    shard = root / "train" / "shard-000000.tar"
    if case == "sample data":
        overwrite_600_bytes(shard, "train-00005.json", "data")  # its label and the next member's header
    elif case.startswith("image bytes"):  # inside one PNG only: no checksum to fail, the image no longer decodes
        overwrite_600_bytes(shard, "train-00005.png", "data", length=40)
    else:
        overwrite_600_bytes(shard, "train-00002.json", "header")  # tar tools now see 2 samples
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = main(["verify", str(root)])
    lines = [record.getMessage() for record in caplog.records]
    verdict = lines[-1]
    read, skipped = reader_skips(root)
    assert read == 30
    if case == "tar header":
        assert skipped == set() and status == 0
        assert lines == ["train/shard-000000.tar: modified: sha256 differs from the manifest; usable: all 30 samples "
                         "read intact (its tar headers are damaged: plain tar tools see 2 samples, csi_dist reads all "
                         "by the manifest's index)",
                         f"verdict: {root}: usable: all 35 samples in 2 shard(s) read intact (1 shard(s) changed "
                         f"outside their samples' data, see above)"]
    elif case == "sample data":
        assert skipped == {"train-00005"} and status == 1
        assert lines[0].startswith("train/shard-000000.tar: modified: sha256 differs from the manifest; usable with 1 "
                                   "damaged sample(s), skipped when read: train-00005 (member json fails its checksum")
        assert lines[0].endswith("the other 29 read intact")
        assert verdict.startswith(f"verdict: {root}: usable with 1 damaged sample(s) of 35, skipped when read: "
                                  f"train/shard-000000.tar train-00005 (train: 1 of 30, more than "
                                  f"data.max_bad_fraction (default 0.01) allows")
    elif case.startswith("image bytes"):
        assert skipped == {"train-00005"} and status == 1
        assert lines[0].startswith("train/shard-000000.tar: modified: sha256 differs from the manifest; usable with 1 "
                                   "damaged sample(s), skipped when read: train-00005 (the png image does not "
                                   "decode (UnidentifiedImageError)); the other 29 decode (this manifest has no "
                                   "per-sample checksums to check them)")
        assert verdict.startswith(f"verdict: {root}: usable with 1 damaged sample(s) of 35")
    else:  # the reader indexes the tar headers itself, finds 2 samples, and skips the whole shard
        assert skipped == {f"train-{index:05d}" for index in range(30)} and status == 1
        assert lines[0] == ("train/shard-000000.tar: unusable: it holds 2 samples, the manifest says 30; all 30 of its "
                            "samples are skipped when read")
        assert verdict == (f"verdict: {root}: unusable: every sample of the train split(s) is skipped when read "
                           f"(train/shard-000000.tar); rewrite the shards with `csi-shards write`")
    assert not re.search(r"(?<!\d)0 damaged|: $", "\n".join(lines), flags=re.MULTILINE), lines


def test_verify_verdict_on_a_missing_shard_is_unusable_as_the_reader_refuses_the_split(tmp_path, caplog):
    from csi_dist.data.shards.reader import ShardError, open_split

    root = factory_shards(tmp_path / "s", {"train": [4, 4], "val": [2]})
    (root / "train" / "shard-000001.tar").unlink()
    with caplog.at_level(logging.INFO):
        assert main(["verify", str(root)]) == 1
    assert caplog.records[-1].getMessage() == (
        f"verdict: {root}: unusable: the train split(s) cannot be opened (train/shard-000001.tar); rewrite the shards "
        f"with `csi-shards write`")
    with pytest.raises(ShardError, match="missing"):
        open_split(root, "train")


def test_sample_keys_are_safe_and_unique():
    assert sample_keys(["123", "a.b", "a_b", "a b", "x/y", "a_b_1"]) == ["123", "a_b", "a_b_2", "a_b_3", "x_y", "a_b_1"]


def test_demo_runs_without_other_arguments(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--demo", "12", "--size", "16", "--workers", "1"]) == 0
    assert verify_shards(tmp_path / "data" / "demo_shards").all_intact
    assert main(["--demo", "12", "--size", "16", "--workers", "1"]) == 0  # re-running replaces the demo


def test_help_shows_every_default_in_user_words(capsys):
    """`write --help` used to hide --size 512, --seed 42, --split-fractions and --shard-max-mb's value."""
    import argparse

    from csi_dist.shards import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, command in [("csi-shards", parser), *commands.choices.items()]:
        for action in command._actions:
            default = action.default
            if default in (None, False, "", argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
                continue
            shown = " ".join(f"{value:g}" for value in default) if isinstance(default, tuple) else (
                f"{default:g}" if isinstance(default, float) else str(default))
            assert shown in action.help and "default" in action.help, (name, action.option_strings, action.help)
        assert not any(re.fullmatch(r"[A-Z_]+", str(action.metavar or "")) and "_" in str(action.metavar)
                       for action in command._actions), name  # no DEMO_OUT-style names of internal variables
    with pytest.raises(SystemExit):
        main(["write", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("--size PIXELS side of the square images stored in the shards (default 512)",
                     "(default 42)", "(default 0.7 0.15 0.15)", "--shard-max-mb MB close a shard once it holds this "
                     "many MB (default 256)", "(default 95)"):
        assert expected in text
