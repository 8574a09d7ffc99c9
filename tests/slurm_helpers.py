"""Drive the local SLURM cluster from tests: submit, signal, wait with timeouts, and read job state."""
from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file


def cluster_problem() -> str | None:
    """Why SLURM tests cannot run here, or None when a cluster with idle nodes answers."""
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on PATH: start the local cluster with slurm/start_cluster.sh"
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return f"sinfo failed ({result.stderr.strip()}): start the local cluster with slurm/start_cluster.sh"
    nodes = [line.split() for line in result.stdout.splitlines() if line.strip()]
    if len(nodes) < 2:
        return f"the SLURM tests need 2 nodes, sinfo shows: {result.stdout.strip()!r}"
    return None


def run(command: list[str], **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}): {result.stderr}"
    return result.stdout


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_field(job_id: str, field: str) -> str | None:
    """A field of `scontrol show job` (None once the job has left the controller's memory)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    match = re.search(rf"\b{field}=(\S+)", result.stdout)
    return match.group(1) if match else None


def wait_for_job_end(job_id: str, timeout: float, start_when_requeued: bool = True) -> str:
    """Wait until the job is finished for good; return its final state (COMPLETED, FAILED, ...).

    A requeued job waits cred_expire (10 s) before it may start again; `StartTime=now` skips that wait.
    """
    deadline = time.monotonic() + timeout
    pending_since = None
    while time.monotonic() < deadline:
        state = job_field(job_id, "JobState")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        requeued = state == "PENDING" and job_field(job_id, "Restarts") not in (None, "0")
        pending_since = (pending_since or time.monotonic()) if requeued else None
        # not at once: a start forced while the old segment is still being killed fails ("Job credential revoked")
        if requeued and start_when_requeued and time.monotonic() - pending_since > 3:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True,
                           timeout=30)
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
    raise AssertionError(f"job {job_id} did not finish within {timeout:.0f} s (cancelled it)")


def sbatch(script: Path, sbatch_args: list[str], script_args: list[str], cwd: Path, env: dict) -> str:
    out = run(["sbatch", "--parsable", *sbatch_args, str(script), *script_args], cwd=cwd, env=env)
    return out.strip().split(";")[0]


def differing_tensors(left: Path, right: Path) -> list[str]:
    """Names of tensors that differ in shape, dtype or any bit (empty = bit-identical state dicts)."""
    a, b = load_file(str(left)), load_file(str(right))
    if a.keys() != b.keys():
        return sorted(a.keys() ^ b.keys())
    return [name for name in a if a[name].shape != b[name].shape or a[name].dtype != b[name].dtype
            or not torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8))]
