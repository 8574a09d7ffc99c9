"""Where a model came from: code, packages, data, config and seeds, and the chain of job segments that trained it.

`<run_dir>/provenance.json` holds {"origin": ..., "segments": [...]}: the origin is recorded when a run directory
first trains and checked when it resumes (a changed config, data or code is logged, not refused: a user may resume
on purpose after a fix); every process start of the run (a first launch, a requeue, a manual rerun) appends a
segment with its SLURM ids, nodes, devices, start and end, and the optimizer steps it took. Each checkpoint carries
a copy, so a checkpoint says where it came from on its own. Torch-free: `python -m csi_dist.lineage` reads it.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from csi_dist.core.config import Config, ConfigError, config_to_dict, load_config
from csi_dist.core.files import atomic_write_json, file_sha256
from csi_dist.core.redaction import redact
from csi_dist.core.run_dir import PROVENANCE as PROVENANCE_NAME, RunDir  # PROVENANCE_NAME: its old name

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements-lock.txt"
TRACKED_PACKAGES = ("torch", "torchvision", "timm", "accelerate", "deepspeed", "webdataset", "numpy", "pandas",
                    "safetensors", "optuna", "submitit")


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def sha256_of(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (a run without a split file, say)."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def code_version(repo: Path = REPO_ROOT) -> dict:
    """The git commit of the csi_dist checkout and whether its tracked files differ from it (None: not a checkout)."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if changes is None else bool(changes)}


def package_versions() -> dict:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "packages": versions, "lock_file_sha256": sha256_of(LOCK_FILE)}


def run_origin(shard_dir: str | Path, resolved_config: Path, seed: int) -> dict:
    """What a run is made of: code, packages, data (manifest and split file hashes), config hash, seed."""
    shard_dir = Path(shard_dir)
    return {"code": code_version(), "environment": package_versions(),
            "data": {"shard_dir": str(shard_dir.resolve()), "manifest_sha256": sha256_of(shard_dir / "manifest.json"),
                     "split_file_sha256": sha256_of(shard_dir / "split.csv")},
            "config_sha256": sha256_of(resolved_config), "seed": seed}


def new_segment(world_size: int, device_names: list[str], start_step: int, strategy: dict | None = None) -> dict:
    """This process start of the run: SLURM job and array ids, requeue count, nodes, devices, start, and the
    strategy that really ran (`strategy`: its name, ZeRO stage, sharded parameters and shards, the process group's
    world size, read from the prepared model: strategies.live_sharding)."""
    environ = os.environ
    return {"slurm_job_id": environ.get("SLURM_JOB_ID"), "slurm_array_job_id": environ.get("SLURM_ARRAY_JOB_ID"),
            "slurm_array_task_id": environ.get("SLURM_ARRAY_TASK_ID"),
            "slurm_restart_count": int(environ.get("SLURM_RESTART_COUNT", "0")),
            "nodes": environ.get("SLURM_JOB_NODELIST") or socket.gethostname(), "world_size": world_size,
            "devices": device_names, "started_utc": now_utc(), "ended_utc": None, "start_step": start_step,
            "end_step": start_step, "outcome": "running", "strategy": strategy}


def read_provenance(run_dir: Path) -> dict:
    path = RunDir(run_dir).provenance
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}


def differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two origins (nested keys joined with dots)."""
    found = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return found


def config_changes(saved_config: Path, config: Config) -> list[str] | None:
    """Key by key, what `config` changes of the config a run saved in `saved_config` (its resolved_config.ini), as
    `optimization.learning_rate 0.003 -> 0.01`; None when there is no readable saved config to compare with."""
    def as_written(loaded: Config) -> dict[str, dict[str, str]]:  # as save_config writes them: secrets masked
        return {section: {key: redact(str(value)) for key, value in values.items()}
                for section, values in config_to_dict(loaded).items()}

    try:
        saved = as_written(load_config(saved_config))
    except ConfigError:
        return None
    current = as_written(config)
    return [f"{section}.{key} {saved[section][key]} -> {value}" for section, values in current.items()
            for key, value in values.items() if saved[section][key] != value]


class ProvenanceRecord:
    """Rank 0's record of the run: the origin once, then this segment, updated at every save."""

    def __init__(self, run_dir: Path, origin: dict, segment: dict):
        self.path = RunDir(run_dir).provenance
        self.data = read_provenance(run_dir)
        self.changes = differences(self.data["origin"], origin) if self.data.get("origin") else []
        self.data.setdefault("origin", origin)
        self.data["segments"] = [*self.data.get("segments", []), segment]
        if self.changes:  # the origin stays the first one; what changed is recorded with the segment it changed in
            self.data.setdefault("origin_changes", []).append({"segment": len(self.data["segments"]) - 1,
                                                              "changes": self.changes})
        self.segment = segment
        self.write()

    def update(self, step: int, outcome: str = "running", finished: bool = False) -> dict:
        """`finished`: the run's end is recorded (its last checkpoint and weights are written): a rerun is complete."""
        self.segment.update(end_step=step, ended_utc=now_utc(), outcome=outcome)
        if finished:
            self.segment["finished"] = True
        self.write()
        return self.data

    def write(self) -> None:
        atomic_write_json(self.path, self.data)
