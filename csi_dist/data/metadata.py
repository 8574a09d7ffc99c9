"""Per-image metadata of the shards (the label CSV's extra columns: site, sex, device, ...): counts for the manifest,
and what a sample's label record and a manifest say about it (shards written before metadata have none)."""
from __future__ import annotations

import collections

METADATA_KEY = "metadata"  # in a sample's label record and in each split of the manifest
COLUMNS_KEY = "metadata_columns"  # the manifest's list of metadata columns, in CSV order


def metadata_counts(records: list[dict], columns: list[str]) -> dict[str, dict]:
    """{column: {"values": {value: images, ...} (sorted by value), "missing": images without a value}} over the
    label records of one split."""
    counts = {}
    for column in columns:
        values = [(record.get(METADATA_KEY) or {}).get(column) for record in records]
        present = collections.Counter(value for value in values if value is not None)
        counts[column] = {"values": dict(sorted(present.items())), "missing": sum(value is None for value in values)}
    return counts


def manifest_metadata_columns(manifest: dict) -> list[str]:
    """The metadata columns a manifest lists; [] for shards written without (or before) metadata."""
    return list(manifest.get(COLUMNS_KEY) or [])


def record_metadata(label: dict) -> dict[str, str | None]:
    """The metadata of one sample's label record ({} when it has none)."""
    return {str(name): None if value is None else str(value) for name, value in (label.get(METADATA_KEY) or {}).items()}
