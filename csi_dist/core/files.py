"""Files that are whole or absent: written to a temporary name beside the target, fsynced, renamed over it, and the
folder fsynced, so a reader (or a rerun after a kill) sees the old file or the new one, never half of one; and the
checksum that tells a file is the one recorded."""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a rename is durable once its folder is)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def user_umask() -> int:
    """This process's umask, read without changing it (os.umask can only read it by setting it, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:  # Linux >= 4.7
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to; on a clean exit it replaces `path`, else it is removed.

    The new file gets mode 0666 & ~umask whatever its writer created it with (safetensors creates its files 0600):
    a run folder on a shared cluster stays as readable as the user's umask makes everything else.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~user_umask())
        fsync_path(temporary)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary_path)` then the atomic replace (for writers that take a path: safetensors, configparser)."""
    with atomic_path(path) as temporary:
        write(temporary)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as temporary:
        # os.open with 0o666 keeps the user's umask (a shared dataset or run folder stays group-readable)
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as handle:
            handle.write(data)


def strict_json_value(value: object) -> object:
    """`value` with every NaN or infinite float replaced by None: strict JSON (null), which every reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def atomic_write_json(path: Path, payload: object, indent: int = 2) -> None:
    """Strict JSON (NaN and infinities as null) with a final newline, written atomically."""
    text = json.dumps(strict_json_value(payload), indent=indent, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (shards and weights files do not need to fit in memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
