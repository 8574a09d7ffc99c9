"""PreemptionWatcher: a signal to any one rank, or the request file, stops all ranks at one step; resume is exact."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, subprocess_env, torchrun_command
from csi_dist.cluster.preemption import REQUEST_FILE_NAME, PreemptionWatcher
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from shard_factory import write_shards

TOY = REPO_ROOT / "tests" / "fixtures" / "toy_preempt_train.py"
STEPS = 40


def expected_value(steps: int, world_size: int = 2) -> float:
    """What the toy loop computes when every step runs exactly once, in order (float64, like the toy)."""
    value = 0.0
    for step in range(steps):
        value = value * 0.5 + step * sum(rank + 1 for rank in range(world_size))
    return value


def start_toy(run_dir: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    command = torchrun_command(2, str(TOY), "--run-dir", str(run_dir), "--steps", str(STEPS),
                               "--step-seconds", "0.1", "--check-every", "2", *extra)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or subprocess_env(CSI_REQUEUE="0"))


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"toy trainer did not finish within {timeout} s:\n{output[-3000:]}")
    return process.returncode, output


def wait_for_training(run_dir: Path, timeout: float = 60) -> None:
    """Until both ranks have written their pid and started stepping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = run_dir / "events.log"
        if events.exists() and events.read_text().count(" start ") == 2:
            time.sleep(0.5)  # a few steps into the loop
            return
        time.sleep(0.1)
    raise AssertionError(f"toy trainer in {run_dir} did not start within {timeout} s")


def events(run_dir: Path) -> list[tuple[str, str, int]]:
    return [(line.split()[1], line.split()[2], int(line.split()[3]))
            for line in (run_dir / "events.log").read_text().splitlines()]


def assert_stopped_together_and_resumes_exactly(run_dir: Path, returncode: int, output: str) -> None:
    assert returncode != 0 and re.search(rf"exitcode\s*:\s*{EXIT_PREEMPTED}\b", output), output[-3000:]
    stops = {rank: step for rank, what, step in events(run_dir) if what == "stop"}
    assert set(stops) == {"rank0", "rank1"} and len(set(stops.values())) == 1, stops
    stop_step = stops["rank0"]
    assert 0 < stop_step < STEPS and stop_step % 2 == 0  # a check step, mid-run
    assert not (run_dir / "final.json").exists()
    assert not (run_dir / REQUEST_FILE_NAME).exists()

    returncode, output = finish(start_toy(run_dir))
    assert returncode == 0, output[-3000:]
    starts = [step for _, what, step in events(run_dir) if what == "start"]
    assert starts == [0, 0, stop_step, stop_step]
    assert json.loads((run_dir / "final.json").read_text()) == {"step": STEPS, "value": expected_value(STEPS)}


@pytest.mark.distributed
@pytest.mark.parametrize(("signum", "target_rank"), [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)])
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, signum, target_rank):
    process = start_toy(tmp_path)
    wait_for_training(tmp_path)
    os.kill(int((tmp_path / f"pid-rank{target_rank}").read_text()), signum)
    returncode, output = finish(process)
    assert f"received {signal.Signals(signum).name}" in output
    assert_stopped_together_and_resumes_exactly(tmp_path, returncode, output)


@pytest.mark.distributed
def test_request_file_stops_every_rank_and_is_removed(tmp_path):
    process = start_toy(tmp_path)
    wait_for_training(tmp_path)
    (tmp_path / REQUEST_FILE_NAME).touch()  # what the sbatch trap does when the launcher, not a rank, is signalled
    returncode, output = finish(process)
    assert_stopped_together_and_resumes_exactly(tmp_path, returncode, output)


@pytest.mark.distributed
def test_request_file_of_an_earlier_job_segment_is_ignored(tmp_path):
    # Slurm's SIGTERM to the old batch shell at requeue time makes its trap write the file once more.
    (tmp_path / REQUEST_FILE_NAME).write_text("7.0\n")
    env = subprocess_env(CSI_REQUEUE="0", SLURM_JOB_ID="7", SLURM_RESTART_COUNT="1")
    returncode, output = finish(start_toy(tmp_path, env=env))
    assert returncode == 0, output[-3000:]
    assert json.loads((tmp_path / "final.json").read_text())["step"] == STEPS
    assert not (tmp_path / REQUEST_FILE_NAME).exists()


class SingleProcess:
    """The accelerator attributes the watcher uses; reduce must not be reached off check steps."""
    device = torch.device("cpu")
    num_processes = 2
    is_main_process = True

    def __init__(self):
        self.reductions = 0

    def reduce(self, tensor, reduction):
        assert reduction == "max"
        self.reductions += 1
        return tensor


def test_should_stop_is_free_between_check_steps_and_sees_the_flag_on_check_steps(tmp_path):
    watcher = PreemptionWatcher(tmp_path, check_every_steps=5)
    accelerator = SingleProcess()
    watcher.received_signal = "SIGUSR1"
    assert [watcher.should_stop(step, accelerator) for step in (1, 2, 3, 4)] == [False] * 4
    assert accelerator.reductions == 0
    assert watcher.should_stop(5, accelerator) is True and accelerator.reductions == 1


def test_forked_worker_ignores_every_notice_sigterm_included(tmp_path):
    """A DataLoader worker is a fork of the main process and inherits the handlers; a SIGTERM to the process group
    must not kill it before its rank has saved (the rank ends its workers itself)."""
    code = f"""
import os, signal, sys, time
from csi_dist.cluster.preemption import PreemptionWatcher
watcher = PreemptionWatcher({str(tmp_path)!r})
watcher.install()
worker = os.fork()
if worker == 0:
    for notice in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        os.kill(os.getpid(), notice)   # all ignored in the worker
    time.sleep(0.2)
    os._exit(7)
_, status = os.waitpid(worker, 0)
print("worker", os.waitstatus_to_exitcode(status), "main flag", watcher.received_signal)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=subprocess_env())
    assert result.stdout.strip() == "worker 7 main flag None", result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_to_the_whole_process_group_checkpoints_and_exits_75(phantom_shards, tmp_path, signum):
    """What `timeout`, SLURM at the end of a step and Ctrl-C do: signal the trainer AND its data-loader workers."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
               "--set", f"data.shard_dir={phantom_shards}", "--set", "data.image_size=32", "--set",
               "training.batch_size=4", "--set", "model.model_arch=Tiny_CNN", "--set", "training.num_workers=2",
               "--set", "training.n_epochs=50",
               "--set", "callbacks.preemption_check_every_steps=1", "--set", "callbacks.checkpoint_every_steps=5",
               "--set", "logging.wandb_mode=disabled"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=subprocess_env(CSI_REQUEUE="0"), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "step-00000005").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, "the trainer ended before its first checkpoint"
        time.sleep(0.1)
    os.killpg(process.pid, signum)  # the process group: the trainer and its DataLoader workers
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr and f"received {signal.Signals(signum).name}" in stderr
    saved = json.loads((sorted((run_dir / "checkpoints").glob("step-*"))[-1] / "trainer_state.json").read_text())
    assert saved["global_step"] > 5  # the stop saved its own checkpoint, after the periodic one



@pytest.mark.slow
def test_a_notice_during_validation_is_not_lost_and_the_resume_validates_that_epoch(tmp_path):
    """One training step per epoch and checks every 2 steps: the notice can only be seen inside validation."""
    shards = write_shards(tmp_path / "shards", {"train": [4], "val": [40], "test": [4]}, image_size=16)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / REQUEST_FILE_NAME).touch()  # a manual request, as if the notice had just arrived
    command = [sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
               "--set", f"data.shard_dir={shards}", "--set", "data.image_size=16", "--set", "training.batch_size=4",
               "--set", "model.model_arch=Tiny_CNN",
               "--set", "training.num_workers=0", "--set", "training.n_epochs=2", "--set",
               "callbacks.preemption_check_every_steps=2", "--set", "logging.wandb_mode=disabled"]
    stopped = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(CSI_REQUEUE="0"), capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert "all ranks stop at step 2" in stopped.stderr  # the 2nd validation batch of epoch 0
    saved = json.loads((run_dir / "checkpoints" / "step-00000001" / "trainer_state.json").read_text())
    assert (saved["epoch"], saved["epoch_position"], saved["history"]) == (0, 4, [])  # trained, not yet validated
    resumed = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(CSI_REQUEUE="0"), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history = json.loads((run_dir / "training_history.json").read_text())
    assert [(record["epoch"], record["global_step"]) for record in history] == [(0, 1), (1, 2)]


def test_the_slurm_module_is_torch_free_and_gives_one_port_per_job_segment():
    """The batch scripts and the sweep driver call it on login and batch nodes: it must start fast, without torch."""
    code = ("import sys, csi_dist.cluster.slurm as slurm; "
            "print(slurm.rendezvous_port(), 'torch' in sys.modules, slurm.main(['after-step', '2', '/nonexistent']))")
    ports = set()
    for restart in ("0", "1"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                                env=subprocess_env(SLURM_JOB_ID="4123", SLURM_RESTART_COUNT=restart))
        port, torch_loaded, after_bad_config = result.stdout.split()
        assert (torch_loaded, after_bad_config) == ("False", "1"), result.stderr  # exit 2: never requeued
        ports.add(int(port))
    assert len(ports) == 2 and all(20000 <= port < 60000 for port in ports)
