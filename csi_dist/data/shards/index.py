"""Where each sample of a tar shard lies: its members' data offsets, sizes and CRC-32s.

`csi-shards` writes this index into the manifest (one list per shard, see format.py). A reader then seeks straight
to a sample and checks its bytes, so damage costs only the samples it hits: a corrupt tar header no longer hides
the rest of its shard, and corrupt bytes that would still decode are caught. Manifests written before the index
existed are indexed from the tar headers at read time (without checksums); there a corrupt header still ends the
shard, as it always did.
"""
from __future__ import annotations

import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

# webdataset's reading of a member name: the key is everything up to the first dot of the file name
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class DamagedSample(ValueError):
    """A sample whose bytes do not match the index: a counted skip, not the end of the shard."""


@dataclass(frozen=True)
class MemberSpan:
    offset: int  # of the member's data in the tar file
    size: int
    crc32: int | None  # None when the index was read from the tar headers


@dataclass(frozen=True)
class IndexedSample:
    key: str
    members: dict[str, MemberSpan]  # by lower-case extension ("png", "json")


def split_member_name(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member name, or None for a name without an extension."""
    match = _MEMBER_NAME.match(name)
    return None if match is None else (match.group(1), match.group(2))


def index_tar(path: Path, *, checksums: bool = True) -> list[IndexedSample]:
    """The samples of a tar shard in file order; consecutive members with the same key form one sample."""
    samples: list[IndexedSample] = []
    with tarfile.open(path, "r:") as archive, open(path, "rb") as data:
        for member in archive:
            parts = split_member_name(member.name) if member.isreg() else None
            if parts is None:
                continue
            key, extension = parts
            if not samples or samples[-1].key != key:
                samples.append(IndexedSample(key, {}))
            crc = None
            if checksums:
                data.seek(member.offset_data)
                crc = zlib.crc32(data.read(member.size))
            samples[-1].members[extension.lower()] = MemberSpan(member.offset_data, member.size, crc)
    return samples


def index_to_json(samples: list[IndexedSample]) -> list[dict]:
    """The manifest form: [{"key": k, "members": {"png": [offset, size, crc32], "json": [...]}}, ...]."""
    return [{"key": sample.key,
             "members": {extension: [span.offset, span.size, span.crc32] for extension, span in sample.members.items()}}
            for sample in samples]


def index_from_json(entries: list, where: str) -> list[IndexedSample]:
    """Read the manifest form back; a malformed entry is an error naming `where` (the shard)."""
    try:
        return [IndexedSample(str(entry["key"]),
                              {str(extension): MemberSpan(int(span[0]), int(span[1]),
                                                          None if span[2] is None else int(span[2]))
                               for extension, span in entry["members"].items()})
                for entry in entries]
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise ValueError(f"{where}: malformed sample index in the manifest ({type(error).__name__}: {error})") from None


def read_members(handle: BinaryIO, sample: IndexedSample) -> dict[str, bytes]:
    """The member bytes of one sample by extension; DamagedSample when they are short or fail their checksum."""
    data = {}
    for extension, span in sample.members.items():
        handle.seek(span.offset)
        payload = handle.read(span.size)
        if len(payload) != span.size:
            raise DamagedSample(f"member {extension}: {len(payload)} of {span.size} bytes (shard cut short)")
        if span.crc32 is not None and zlib.crc32(payload) != span.crc32:
            raise DamagedSample(f"member {extension} fails its checksum (damaged bytes)")
        data[extension] = payload
    return data
