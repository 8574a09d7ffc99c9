"""`csi-shards verify`: whether written shards are usable, shard by shard and as a set, judged the way the reader
will read them (size, sha256, and for a changed shard each sample's checksums and decoding), without torch."""
from __future__ import annotations

import collections
import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from csi_dist.core.config import DataConfig
from csi_dist.data.shards.format import FORMAT_VERSION, IMAGE_EXTENSIONS, LABEL_EXTENSION, MANIFEST_NAME
from csi_dist.data.shards.index import DamagedSample, index_from_json, index_tar, read_members
from csi_dist.core.domain import NUM_ZONES, UNKNOWN_CLASS
from csi_dist.core.files import file_sha256

NAMED_SAMPLES = 20  # damaged samples `verify` names before "and N more"


@dataclass
class ShardVerdict:
    """What the reader will do with one shard: read all its samples, skip some (named), or not read it at all."""

    split: str
    path: str  # relative to the manifest's directory
    count: int  # samples the manifest lists
    lost: dict[str, str] = field(default_factory=dict)  # key -> why the reader skips it
    blocks_split: str = ""  # why the reader refuses to open the whole split ("" when it opens)
    unreadable: str = ""  # why the reader skips every sample of the shard ("" when it reads it)
    notes: list[str] = field(default_factory=list)  # changes that cost no sample
    unchecked: bool = False  # modified, but the manifest has no per-sample checksums to tell which samples
    checksums: bool = True  # the manifest indexes the shard's samples with their CRC-32s

    @property
    def intact(self) -> bool:
        return not (self.lost or self.blocks_split or self.unreadable or self.notes or self.unchecked)

    def line(self) -> str:
        """The shard's verdict in one line."""
        if self.blocks_split:
            return (f"{self.path}: unusable: {self.blocks_split}; the reader refuses the whole {self.split} split, so "
                    f"commands that read it stop before their first step")
        if self.unreadable:
            return (f"{self.path}: unusable: {self.unreadable}; all {self.count} of its samples are skipped when "
                    f"read")
        head = f"{self.path}: modified: sha256 differs from the manifest; "
        if self.lost:
            return (head + f"usable with {len(self.lost)} damaged sample(s), skipped when read: "
                    + _named(f"{key} ({reason})" for key, reason in self.lost.items())
                    + (f"; the other {self.count - len(self.lost)} read intact" if self.checksums else
                       f"; the other {self.count - len(self.lost)} decode (this manifest has no per-sample checksums "
                       f"to check them)"))
        if self.unchecked:
            return (head + f"all {self.count} samples decode, but this manifest has no per-sample checksums to tell "
                    f"changed ones: rewrite the shards (csi-shards write) to be sure")
        return head + f"usable: all {self.count} samples read intact ({'; '.join(self.notes)})"


def _named(items: Iterable[str], limit: int = NAMED_SAMPLES) -> str:
    items = list(items)
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _sample_fault(members: dict[str, bytes]) -> str | None:
    """Why the reader would skip a sample with these member bytes (reader.ShardStream._sample), None if it reads it;
    decoded with PIL/numpy as the reader does, without torch."""
    try:
        label = json.loads(members[LABEL_EXTENSION])
        zones = [int(zone) for zone in label["zones"]]
        if len(zones) != NUM_ZONES or not all(0 <= zone <= UNKNOWN_CLASS for zone in zones):
            return f"zones {label['zones']} are not {NUM_ZONES} values in 0..{UNKNOWN_CLASS}"
        str(label["file_id"])
        for name in ("csi", "ahf"):
            if label.get(name) is not None:
                float(label[name])
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if extension is None:
            return "no image member"
    except Exception as error:  # noqa: BLE001 - the reader skips the sample on any of these
        return f"label does not parse: {type(error).__name__}: {error}"
    try:
        if extension == "npy":
            pixels = np.load(io.BytesIO(members[extension]), allow_pickle=False)
            if pixels.dtype != np.uint8 or pixels.ndim != 2:
                return f"expected a 2-D uint8 array, got {pixels.dtype} {pixels.shape}"
        else:
            with Image.open(io.BytesIO(members[extension])) as image:
                image.convert("L")
    except Exception as error:  # noqa: BLE001 - PIL and numpy raise many types for damaged bytes
        return f"the {extension} image does not decode ({type(error).__name__})"
    return None


def _verify_shard(out_dir: Path, split: str, entry: dict) -> ShardVerdict:
    """One shard as reader.open_split and reader.ShardReader will treat it."""
    verdict = ShardVerdict(split, entry["path"], int(entry["count"]))
    path = out_dir / entry["path"]
    if not path.is_file():
        verdict.blocks_split = "the shard file is missing"
        return verdict
    size = path.stat().st_size
    if size != entry["bytes"]:
        state = "truncated" if size < entry["bytes"] else "size changed"
        verdict.blocks_split = f"{state}: {size} bytes, manifest says {entry['bytes']}"
        return verdict
    try:
        index = None if entry.get("samples") is None else index_from_json(entry["samples"], entry["path"])
    except ValueError as error:
        verdict.blocks_split = str(error).removeprefix(f"{entry['path']}: ")
        return verdict
    modified = file_sha256(path) != entry["sha256"]
    try:  # the reader's index: the manifest's, else (older manifests) the tar headers'
        samples = index if index is not None else index_tar(path, checksums=False)
    except (tarfile.TarError, OSError, EOFError) as error:
        verdict.unreadable = f"its tar headers cannot be read ({error})"
        return verdict
    if len(samples) != verdict.count:
        verdict.unreadable = f"it holds {len(samples)} samples, the manifest says {verdict.count}"
        return verdict
    if not modified:
        return verdict
    with open(path, "rb") as handle:
        for sample in samples:
            try:
                reason = _sample_fault(read_members(handle, sample))
            except DamagedSample as error:
                reason = str(error)
            if reason is not None:
                verdict.lost[sample.key] = reason
    if index is None:
        verdict.checksums = False
        verdict.unchecked = not verdict.lost
        return verdict
    try:
        in_tar = len(index_tar(path, checksums=False))
    except (tarfile.TarError, OSError, EOFError):
        in_tar = 0
    if in_tar != verdict.count:
        verdict.notes.append(f"its tar headers are damaged: plain tar tools see {in_tar} samples, csi_dist reads "
                             f"all by the manifest's index")
    else:
        verdict.notes.append("the changed bytes lie outside the samples' data")
    return verdict


@dataclass
class Verification:
    """`verify_shards`' answer: a verdict per shard and one for the whole set."""

    directory: Path
    shards: list[ShardVerdict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the manifest itself: unreadable, or counts that disagree
    manifest_unreadable: bool = False

    @property
    def usable(self) -> bool:
        return not self.manifest_unreadable and not any(shard.blocks_split for shard in self.shards)

    @property
    def all_intact(self) -> bool:
        """Every sample reads intact (exit 0)."""
        return self.usable and not any(shard.lost or shard.unreadable or shard.unchecked for shard in self.shards)

    def verdict(self) -> str:
        """The whole set in one line: usable / usable with N damaged samples, named / unusable."""
        where = str(self.directory)
        if self.manifest_unreadable:
            return f"{where}: unusable: {self.problems[0]}"
        blocked = [shard for shard in self.shards if shard.blocks_split]
        if blocked:
            splits = sorted({shard.split for shard in blocked})
            return (f"{where}: unusable: the {', '.join(splits)} split(s) cannot be opened "
                    f"({_named(shard.path for shard in blocked)}); rewrite the shards with `csi-shards write`")
        total = sum(shard.count for shard in self.shards)
        lost_by_split = collections.Counter()
        for shard in self.shards:
            lost_by_split[shard.split] += shard.count if shard.unreadable else len(shard.lost)
        unchecked = [shard.path for shard in self.shards if shard.unchecked]
        if not sum(lost_by_split.values()):
            if unchecked:
                return (f"{where}: usable, unchecked: all {total} samples decode, but {_named(unchecked)} changed and "
                        f"this manifest has no per-sample checksums; rewrite the shards to be sure")
            changed = sum(1 for shard in self.shards if shard.notes)
            return (f"{where}: usable: all {total} samples in {len(self.shards)} shard(s) read intact"
                    + (f" ({changed} shard(s) changed outside their samples' data, see above)" if changed else ""))
        split_sizes = collections.Counter()
        for shard in self.shards:
            split_sizes[shard.split] += shard.count
        emptied = [split for split, lost in lost_by_split.items() if lost and lost == split_sizes[split]]
        if emptied:
            return (f"{where}: unusable: every sample of the {', '.join(emptied)} split(s) is skipped when read "
                    f"({_named(shard.path for shard in self.shards if shard.split in emptied and shard.count)}); "
                    f"rewrite the shards with `csi-shards write`")
        names = [f"{shard.path} {key}" if not shard.unreadable else f"{shard.path} (all {shard.count})"
                 for shard in self.shards for key in (shard.lost if not shard.unreadable else [""])]
        shares = []
        for split, lost in lost_by_split.items():
            if lost:
                over = lost > math.floor(DataConfig.max_bad_fraction * split_sizes[split])
                shares.append(f"{split}: {lost} of {split_sizes[split]}"
                              + (f", more than data.max_bad_fraction (default {DataConfig.max_bad_fraction:g}) "
                                 f"allows: a run on it stops unless you raise that or rewrite the shards" if over
                                 else ""))
        return (f"{where}: usable with {sum(lost_by_split.values())} damaged sample(s) of {total}, skipped when "
                f"read: {_named(names)} ({'; '.join(shares)})")


def verify_shards(out_dir: str | Path) -> Verification:
    """Check every shard of the manifest as the reader will read it: its size and sha256, and, when it changed,
    each sample's checksums and decoding. The verdicts say what training and evaluation will do with the data."""
    out_dir = Path(out_dir)
    result = Verification(out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        manifest = None
        result.problems.append(f"cannot read {manifest_path}: {err}")
    if manifest is not None and manifest.get("format") != FORMAT_VERSION:
        result.problems.append(f"{manifest_path}: format {manifest.get('format')!r}; expected {FORMAT_VERSION!r}")
    if result.problems:
        result.manifest_unreadable = True
        return result
    for name, split in manifest["splits"].items():
        listed = sum(shard["count"] for shard in split["shards"])
        if listed != split["count"]:
            result.problems.append(f"{name}: the manifest's split count is {split['count']} but its shards list "
                                   f"{listed} samples (the reader goes by the shards')")
        result.shards += [_verify_shard(out_dir, name, shard) for shard in split["shards"]]
    return result
