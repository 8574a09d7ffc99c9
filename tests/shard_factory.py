"""Tiny shard directories in the csi-shards format, written directly for reader and trainer tests."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from webdataset import TarWriter

from csi_dist.data.shards.format import FORMAT_VERSION, MANIFEST_NAME
from csi_dist.data.shards.index import index_tar, index_to_json


def png_bytes(value: int, size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value % 256, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, shard_sizes: dict[str, list[int]], image_size: int = 16,
                 corrupt_ids: frozenset[str] = frozenset(), edit_sample: Callable[[dict], dict] | None = None,
                 sample_index: bool = True) -> Path:
    """Shards whose sample i has FileID f"{split}-{i:05d}" and a constant image of value i (mod 256).

    `edit_sample(sample)` may change a sample's tar members (a dict of `__key__`, `png`, `json`) before it is
    written; the manifest's counts stay those of `shard_sizes`. `sample_index=False` writes a manifest as
    csi-shards did before the per-sample index.
    """
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT_VERSION, "image_size": image_size, "image_format": "png", "has_ahf_labels": True,
                "splits": {}, "skipped": {"count": 0, "samples": []}}
    for split, sizes in shard_sizes.items():
        (root / split).mkdir(exist_ok=True)
        entries, index = [], 0
        for shard_number, size in enumerate(sizes):
            relative = f"{split}/shard-{shard_number:06d}.tar"
            with TarWriter(str(root / relative)) as writer:
                for _ in range(size):
                    file_id = f"{split}-{index:05d}"
                    zones = [(index + zone) % 5 for zone in range(6)]
                    image = b"not an image" if file_id in corrupt_ids else png_bytes(index, image_size)
                    sample = {"__key__": file_id, "png": image,
                              "json": json.dumps({"file_id": file_id, "zones": zones, "csi": 1.5,
                                                  "ahf": index % 2, "patient_id": None}).encode()}
                    writer.write(edit_sample(sample) if edit_sample else sample)
                    index += 1
            data = (root / relative).read_bytes()
            entries.append({"path": relative, "count": size, "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
            if sample_index:
                entries[-1]["samples"] = index_to_json(index_tar(root / relative))
        manifest["splits"][split] = {"count": index, "shards": entries}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return root
