"""Honest run outcomes (issue 14): a run that learned nothing or could not validate never ends "completed" silently.

Trainer runs go through tests/scripts/train_runs.py, several per launch, and are read back as a user would: the
exit status, the log, training_history.json with a strict JSON parser, the run directory.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR, EXIT_TOO_MANY_BAD_SAMPLES, EXIT_TOO_MANY_BAD_STEPS
from csi_dist.train import main
from shard_factory import write_shards
from test_parity import train_runs

pytestmark = [pytest.mark.slow]
SMALL = ["model.model_arch=Tiny_CNN", "data.image_size=32", "training.batch_size=8", "training.num_workers=0",
         "logging.wandb_mode=disabled"]


def strict_json(path: Path) -> object:
    def refuse(constant: str):
        raise AssertionError(f"{path}: bare {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_every_update_skipped_is_an_error_not_a_completed_run(phantom_shards, tmp_path: Path):
    settings = [f"data.shard_dir={phantom_shards}", *SMALL, "training.max_steps=3"]
    statuses = train_runs(1, tmp_path, settings, {"all_skipped": ""},
                          env=subprocess_env(CSI_FAULT_NONFINITE_LOSS="0:nan,1:inf,2:nan"))
    assert statuses == {"all_skipped": EXIT_TOO_MANY_BAD_STEPS}
    log = (tmp_path / "statuses-0.log").read_text()
    assert "every one of the 3 optimizer steps had a non-finite loss or gradient and was skipped" in log
    assert "training finished (completed)" not in log


def test_eval_every_epochs_an_empty_val_split_and_strict_history(phantom_shards, tmp_path: Path):
    no_val = write_shards(tmp_path / "no_val", {"train": [20], "val": [], "test": [4]}, image_size=16)
    # no validation, no judging on it: early stopping with patience 1 and a plateau schedule that would halve the
    # lr after every evaluation without improvement, on a split with nothing to evaluate
    runs = {"every_second_epoch": f"data.shard_dir={phantom_shards},training.n_epochs=3,training.eval_every_epochs=2",
            "empty_val": f"data.shard_dir={no_val},training.n_epochs=3,callbacks.early_stopping_patience=1,"
                         "optimization.scheduler=reducelronplateau,optimization.patience=0,optimization.factor=0.5,"
                         "optimization.warmup_epochs=0"}
    assert train_runs(1, tmp_path, SMALL, runs) == {name: 0 for name in runs}
    history = strict_json(tmp_path / "every_second_epoch" / "training_history.json")
    assert [record["epoch"] for record in history] == [1, 2]  # every 2nd epoch, and the last one
    log = (tmp_path / "statuses-0.log").read_text()
    assert "the val split is EMPTY" in log and "the run trains all 3 epochs" in log
    assert "training finished (completed WITHOUT VALIDATION (the val split is empty)) after 9 optimizer steps; no " \
           "best weights (nothing was validated): weights/last.safetensors is the model" in log
    assert "early stopping: no improvement" not in log
    empty = strict_json(tmp_path / "empty_val" / "training_history.json")
    assert [record["val_loss"] for record in empty] == [None, None, None]  # every epoch; null, not a bare NaN
    assert [record["lr"] for record in empty] == [0.002] * 3  # the config's lr: no plateau was judged
    weights = tmp_path / "empty_val" / "weights"
    assert sorted(path.name for path in weights.iterdir()) == ["last.safetensors"]  # no best chosen
    for run in runs:  # every checkpoint's trainer state is strict JSON too (an empty split's best value: null)
        for checkpoint in (tmp_path / run / "checkpoints").glob("step-*"):
            strict_json(checkpoint / "trainer_state.json")


def test_no_config_is_an_error_and_debug_runs_write_their_own_directory(phantom_shards, tmp_path: Path, caplog,
                                                                      capsys):
    assert main([]) == EXIT_CONFIG_ERROR
    assert "no --config given" in caplog.text
    real = tmp_path / "demo"
    assert main(["--config", "configs/demo.ini", "--run-dir", str(real), "--debug",
                 "--set", f"data.shard_dir={phantom_shards}", "--set", "data.image_size=32"]) == 0
    assert not real.exists()  # the real run's checkpoints and weights are never touched by --debug
    assert (tmp_path / "demo-debug" / "weights" / "last.safetensors").is_file()
    # rerun: the debug run's own finished run is complete (nothing trained); --resume never is refused there as anywhere
    # (the trainer's logging replaces caplog's handler: its lines are read from stderr)
    debug = ["--config", "configs/demo.ini", "--run-dir", str(real), "--debug", "--set",
             f"data.shard_dir={phantom_shards}", "--set", "data.image_size=32"]
    capsys.readouterr()
    assert main(debug) == 0
    assert f"the run in {tmp_path / 'demo-debug'} is complete" in capsys.readouterr().err
    assert main([*debug, "--resume", "never"]) == EXIT_CONFIG_ERROR
    assert f"{tmp_path / 'demo-debug'} already holds a run" in capsys.readouterr().err and not real.exists()


def test_unreadable_train_data_stops_the_run_and_padding_copies_are_not_failures(tmp_path: Path):
    """A train shard of random bytes used to give `training finished (completed)` after training on nothing; a corrupt
    val image repeated by the sampler's padding used to count twice."""
    unreadable = write_shards(tmp_path / "unreadable", {"train": [24], "val": [4], "test": [4]}, image_size=16)
    shard = unreadable / "train" / "shard-000000.tar"
    shard.write_bytes(np.random.default_rng(0).bytes(shard.stat().st_size))
    manifest = json.loads((unreadable / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (unreadable / "manifest.json").write_text(json.dumps(manifest))
    # val: 5 samples in batches of 4 -> 3 padding copies, the first of them a copy of the corrupt val-00000
    corrupt_val = write_shards(tmp_path / "corrupt_val", {"train": [24], "val": [5], "test": [4]}, image_size=16,
                               corrupt_ids=frozenset({"val-00000"}))
    runs = {"unreadable": f"data.shard_dir={unreadable}",
            "corrupt_val": f"data.shard_dir={corrupt_val},data.max_bad_fraction=0.25"}
    settings = [*SMALL, "training.batch_size=4", "training.n_epochs=1", "data.image_size=16"]
    assert train_runs(1, tmp_path, settings, runs) == {"unreadable": EXIT_TOO_MANY_BAD_SAMPLES, "corrupt_val": 0}
    log = (tmp_path / "statuses-0.log").read_text()
    assert (f"24 of the 24 train samples in {unreadable} could not be read or decoded this epoch, more than "
            f"data.max_bad_fraction = 0.01 allows (0)") in log
    history = strict_json(tmp_path / "corrupt_val" / "training_history.json")
    assert [(record["train_decode_failures"], record["val_decode_failures"]) for record in history] == [(0, 1)]


def test_evaluate_names_a_model_it_cannot_build_and_exits_2(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = Path("configs/demo.ini").read_text().replace("model_arch = Custom_1", "model_arch = no_such_backbone")
    (run_dir / "resolved_config.ini").write_text(config)
    result = subprocess.run([sys.executable, "-m", "csi_dist.evaluate", "--run-dir", str(run_dir)], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "unknown model_arch 'no_such_backbone'" in result.stderr and "Traceback" not in result.stderr
