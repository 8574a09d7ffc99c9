"""csi_dist.bench on the CPU with a tiny case: every column is measured and read back from the real trainer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env


@pytest.mark.slow
def test_bench_measures_ceiling_loader_files_and_the_real_trainer(tmp_path: Path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "csi_dist.bench", "--case", "Tiny_CNN@32x8", "--steps", "4", "--warmup", "2",
         "--workers", "1", "--loader-batches", "3", "--pil-baseline", "--restart", "--image-format", "npy", "--gpu-augment", "true",
         "--work-dir", str(tmp_path / "work"),
         "--out", str(out)], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    for part in ("ceiling", "ceiling_finishing", "loader", "files", "end_to_end"):
        assert row[part]["images_per_second"] > 0, part
    assert 0 < row["end_to_end"]["seconds_to_first_step"] < 120
    assert 0 < row["end_to_end"]["restart_seconds_to_first_step"] < 120  # the relaunch resumed and took a step
    assert row["end_to_end"]["peak_gpu_memory_gib"] is None  # CPU: no GPU memory to report
    assert 0.0 <= row["end_to_end"]["data_wait_share"] <= 1.0
    assert "| Tiny_CNN@32 bs8 ddp npy gpu_augment=true | 1 |" in result.stdout
