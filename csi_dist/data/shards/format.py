"""The on-disk shard format shared by the writer and the reader (one source of truth for names and keys).

Layout of a shard directory written by `csi-shards`:

    <out>/manifest.json               MANIFEST_NAME, see below
    <out>/split.csv                   FileID;patient_id;split  (the split actually used, reproducible)
    <out>/<split>/shard-000000.tar    tar members per sample: "<key>.png" (or .jpg, .npy) + "<key>.json"

`<key>` is the sample key: the FileID with every character outside [A-Za-z0-9_-] replaced by "_" (webdataset
splits a member name at the first dot), made unique with a numeric suffix when two FileIDs collide.

The "<key>.json" member holds LABEL_KEYS:
    {"file_id": "28694662", "zones": [0, 1, 4, 2, 3, 0], "csi": 1.2 | null, "ahf": 0 | 1 | null,
     "patient_id": "P001" | null, "metadata": {"site": "A", "sex": null, ...}}
"metadata" (only when the label CSV has extra columns: every column beyond FileID, the zones, csi, patient_id and
ahf) holds each extra column's text, null for an empty cell; shards without it have no metadata.
zones use the coding of csi_dist.core.domain (0-3 grades, 4 unknown). The image is 8-bit grayscale (mode "L"),
already resized to manifest["image_size"] x manifest["image_size"]: a PNG (lossless), a JPEG, or (npy) the raw
uint8 array in numpy's format, lossless and nothing to decode, at about 1.5x the bytes of a PNG.

manifest.json:
    {"format": FORMAT_VERSION, "image_size": 512, "image_format": "png" | "jpg" | "npy",
     "created_utc": "...", "source_csv": "...", "split_seed": 42, "split_fractions": [0.7, 0.15, 0.15],
     "has_ahf_labels": bool, "metadata_columns": ["site", "sex"],
     "splits": {"train": {"count": N, "label_histogram": {"right_sup": [n0, n1, n2, n3, n4], ...},
                          "metadata": {"site": {"values": {"A": 40, "B": 12}, "missing": 3}, ...} (with columns),
                          "shards": [{"path": "train/shard-000000.tar", "count": 128, "bytes": 123456,
                                      "sha256": "...", "samples": [...]}, ...]},
                "val": {...}, "test": {...}},
     "skipped": {"count": k, "samples": [{"file_id": "...", "row": 17, "reason": "..."}]}}
A shard's "samples" is its per-sample index, in tar order: [{"key": "<key>", "members": {"png": [data offset,
size, crc32], "json": [...]}}, ...] (see index.py); readers seek to a sample with it and skip only the samples
whose bytes fail their checksum. Manifests without "samples" (written before it) are indexed from the tar headers.
Shard paths are relative to the manifest's directory. "row" is the label CSV line (header = line 1).
Fields added by the writer (readers may ignore them): "source_images" (image directory), "split_file" (the
split.csv reused with --split-file, or null), "excluded_file_ids" (ids left out with --exclude-ids).
An empty split has "count": 0 and "shards": []. Identical inputs give byte-identical shards (fixed tar mtime).
"""
from __future__ import annotations

FORMAT_VERSION = "csi-shards/1"
MANIFEST_NAME = "manifest.json"
SPLIT_FILE_NAME = "split.csv"
SPLIT_NAMES = ("train", "val", "test")
SHARD_PATTERN = "shard-%06d.tar"
LABEL_EXTENSION = "json"
IMAGE_EXTENSIONS = ("png", "jpg", "npy")  # npy: raw uint8 arrays, nothing to decode
LABEL_KEYS = ("file_id", "zones", "csi", "ahf", "patient_id", "metadata")
