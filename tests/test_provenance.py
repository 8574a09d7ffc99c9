"""Provenance (issue 18): a run requeued twice shows three job segments; code, data and config are traceable."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.cluster.preemption import REQUEST_FILE_NAME
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from shard_factory import write_shards

pytestmark = [pytest.mark.slow]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=subprocess_env(CSI_REQUEUE="0", **env))


def test_a_run_requeued_twice_shows_three_segments_and_what_it_was_made_of(phantom_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", "configs/demo.ini", "--run-dir", str(run_dir), "--set", f"data.shard_dir={phantom_shards}",
              "--set", "data.image_size=16", "--set", "training.batch_size=8", "--set", "model.model_arch=Tiny_CNN",
              "--set", "training.num_workers=0",
              "--set", "logging.wandb_mode=disabled", "--set", "training.max_steps=6",
              "--set", "callbacks.preemption_check_every_steps=2"]
    for restart in range(3):  # one job, started, then preempted and requeued twice: the same command each time
        preempted = restart < 2
        if preempted:
            run_dir.mkdir(exist_ok=True)
            (run_dir / REQUEST_FILE_NAME).touch()  # a notice, seen at the next check step
        result = run("csi_dist.train", *common, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT=str(restart),
                     SLURM_JOB_NODELIST="n[1-2]")
        assert result.returncode == (EXIT_PREEMPTED if preempted else 0), result.stderr[-3000:]

    shown = run("csi_dist.lineage", str(run_dir))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "3 job segment(s):" in text and "changed at" not in text, text
    segments = [line for line in text.splitlines() if line.startswith("  ")]
    for line, (restart, start, end, outcome) in zip(segments, [(0, 0, 2, "stopped by a preemption notice"),
                                                               (1, 2, 4, "stopped by a preemption notice"),
                                                               (2, 4, 6, "completed")], strict=True):
        assert line.startswith(f"  {restart + 1}. SLURM job 4242, restart {restart}; 1 process(es) on n[1-2]"), text
        assert line.endswith(f"steps {start} -> {end}; {outcome}"), text
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert f"code: commit {commit}" in text
    assert sha256(phantom_shards / "manifest.json") in text
    assert sha256(run_dir / "resolved_config.ini") in text
    assert "last validation: epoch" in text

    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    carried = json.loads((newest / "trainer_state.json").read_text())["provenance"]
    assert [segment["slurm_restart_count"] for segment in carried["segments"]] == [0, 1, 2]


def test_evaluate_warns_when_the_shards_are_not_the_ones_the_model_was_trained_on(phantom_shards, trained_run,
                                                                                 tmp_path):
    run_dir = trained_run  # trained on phantom_shards, and evaluated on them, by the fixture
    own = run("csi_dist.evaluate", "--run-dir", str(run_dir), "--splits", "test", "--out", str(tmp_path / "own"))
    assert own.returncode == 0 and "not the ones this model was trained on" not in own.stderr, own.stderr[-3000:]
    recorded = json.loads((run_dir / "evaluation" / "provenance.json").read_text())
    assert recorded["evaluated"]["manifest_sha256"] == sha256(phantom_shards / "manifest.json")
    assert recorded["evaluated"]["weights_sha256"] == sha256(run_dir / "weights" / "best.safetensors")

    other = write_shards(tmp_path / "other", {"train": [8], "val": [4], "test": [6]}, image_size=16)
    elsewhere = run("csi_dist.evaluate", "--run-dir", str(run_dir), "--splits", "test", "--shard-dir", str(other),
                    "--out", str(tmp_path / "elsewhere"))
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert f"the shards in {other} are not the ones this model was trained on" in elsewhere.stderr
