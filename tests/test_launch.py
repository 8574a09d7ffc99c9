"""The documented multi-process command (`python -m csi_dist.launcher`, README "Training") ends the way its ranks did:
a notice to its whole process group gives a checkpoint, exit 75 and one line on how to resume, no traceback; and
each rank sees the environment `accelerate launch` would give it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, free_port, subprocess_env
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.launcher import launch_status, parse_launch, rank_environments

LAUNCH = [sys.executable, "-m", "csi_dist.launcher"]  # what `csi-launch` runs
# Not the config's: torch's elastic agent's bookkeeping (error files, restarts, its store, role names, its signals),
# which ranks started without the agent do not have; what `import deepspeed` in accelerate's DeepSpeed launcher sets
# (each rank's own import sets it too); what `sh` sets for itself
NOT_FROM_THE_CONFIG = {"TORCHELASTIC_ERROR_FILE", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
                       "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_SIGNALS_TO_HANDLE",
                       "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE", "PYTORCH_NVML_BASED_CUDA_CHECK",
                       "PWD", "OLDPWD", "SHLVL", "_"}


def start_launch(launch: list[str], config_file: str, num_processes: int, run_dir: Path, shards: Path,
                 env: dict[str, str], *settings: str) -> subprocess.Popen:
    """A Tiny_CNN run that trains long (workers on, a notice checked every step) in a session of its own."""
    command = [*launch, "--config_file", config_file, "--num_processes", str(num_processes),
               "--main_process_port", str(free_port()),
               "-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
               "--set", f"data.shard_dir={shards}", "--set", "data.image_size=32", "--set", "training.batch_size=4",
               "--set", "model.model_arch=Tiny_CNN", "--set", "training.num_workers=1",
               "--set", "training.n_epochs=50", "--set", "callbacks.early_stopping_patience=100",
               "--set", "callbacks.preemption_check_every_steps=1", "--set", "callbacks.checkpoint_every_steps=5",
               "--set", "logging.wandb_mode=disabled", *[part for setting in settings for part in ("--set", setting)]]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(run_dir.parent / f"{run_dir.name}.stderr", "w"))


def notice_once_training(process: subprocess.Popen, run_dir: Path, signum: int) -> str:
    """After the first periodic checkpoint, `signum` to the launch's whole process group (what Ctrl-C in a terminal,
    `timeout` and `kill -- -PGID` do); the launch's stderr once it has ended."""
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "step-00000005").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, (
            f"the launch ended (or hung) before its first checkpoint:\n{stderr_of(run_dir)[-3000:]}")
        time.sleep(0.1)
    os.killpg(process.pid, signum)
    try:
        process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError(f"the launch did not end after {signum!r}:\n{stderr_of(run_dir)[-3000:]}")
    return stderr_of(run_dir)


def stderr_of(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.stderr").read_text()


def assert_saved_and_ended_75_with_one_resume_line(returncode: int, stderr: str, run_dir: Path, signum: int,
                                                   ranks: int) -> None:
    assert returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert [line for line in stderr.splitlines() if "to resume" in line] == [
        line for line in stderr.splitlines() if "exiting with 75: rerun the command with --resume auto (the default) to resume" in line] != []
    assert all(f"[rank{rank}] csi_dist.cluster.preemption: received {signal.Signals(signum).name}" in stderr
               for rank in range(ranks))  # passed on to every rank (their own sessions: not from the group)
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["global_step"] > 5  # saved on the notice


@pytest.mark.distributed
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_notice_to_the_documented_launch_checkpoints_and_exits_75_with_one_resume_line(phantom_shards, tmp_path,
                                                                                        signum):
    """2 ranks from the shipped ddp.yaml on the CPU (gloo), data-loader workers on. Under `accelerate launch` the same
    run saves and its ranks exit 75, but the shell reads exit 1 and torch's SignalException traceback."""
    run_dir = tmp_path / "run"
    process = start_launch(LAUNCH, "launch/accelerate/ddp.yaml", 2, run_dir, phantom_shards,
                           subprocess_env(CSI_REQUEUE="0"))
    stderr = notice_once_training(process, run_dir, signum)
    assert_saved_and_ended_75_with_one_resume_line(process.returncode, stderr, run_dir, signum, ranks=2)


@pytest.mark.distributed
def test_each_rank_gets_the_environment_accelerate_launch_gives_it(tmp_path, monkeypatch):
    """What accelerate's own launch hands its 2 ranks for the shipped ZeRO-3 config (read back from the ranks it
    started), against what this launcher prepares: the strategy variables (ACCELERATE_USE_DEEPSPEED, the ZeRO stage,
    the fields DeepSpeed takes from the config, precision), the rendezvous and the rest of the environment. DeepSpeed
    has a path of its own here; DDP and FSDP configs get accelerate's prepare_multi_gpu_env as it is (the ddp.yaml
    launches above start on it)."""
    port = str(free_port())
    argv = ["--config_file", "launch/accelerate/deepspeed_zero3.yaml", "--num_processes", "2",
            "--main_process_port", port, "--no_python", "sh", "-c", f'env -0 > "{tmp_path}/rank$RANK"']
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *argv], cwd=REPO_ROOT, env=subprocess_env(),
                   check=True, capture_output=True, timeout=300)
    for key, value in subprocess_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO_ROOT)
    ours = rank_environments(parse_launch(argv))
    assert len(ours) == 2
    for rank, prepared in enumerate(ours):
        theirs = dict(entry.split("=", 1) for entry in (tmp_path / f"rank{rank}").read_text().split("\0") if entry)
        assert {key: value for key, value in prepared.items() if key not in NOT_FROM_THE_CONFIG} == {
            key: value for key, value in theirs.items() if key not in NOT_FROM_THE_CONFIG}
    assert (ours[1]["RANK"], ours[1]["MASTER_PORT"], ours[1]["ACCELERATE_USE_DEEPSPEED"],
            ours[1]["ACCELERATE_DEEPSPEED_ZERO_STAGE"]) == ("1", port, "true", "3")


def test_the_launch_ends_with_the_ranks_outcome_and_names_the_first_failure(caplog):
    assert launch_status([(1, 0), (0, 0)]) == 0
    assert launch_status([(1, EXIT_PREEMPTED), (0, EXIT_PREEMPTED)]) == EXIT_PREEMPTED
    assert launch_status([(0, EXIT_PREEMPTED), (1, 0)]) == EXIT_PREEMPTED  # a rank that had finished its work
    assert launch_status([(1, -signal.SIGKILL), (0, 3)]) == 137  # the rank lost first, not the survivor's 3
    assert "rank 1 was the first to fail, with exit status 137 (killed by SIGKILL)" in caplog.text
    assert launch_status([(0, EXIT_PREEMPTED), (1, 2)]) == 2  # a failure outweighs the others' clean stop
