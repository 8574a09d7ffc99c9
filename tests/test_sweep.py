"""Sweeps: search-space files, trial budget, best_params.json for the trainer, and real sweeps (local and SLURM).

The end-to-end sweeps train Custom_1 on a 160-image phantom at 32 px for 3 epochs per trial, with the CI space
(configs/sweep/phantom_ci.ini): its sampler is random and seeded by trial number, and half its learning rates are
too small to learn, so the median pruner stops some trials whichever job runs them.
"""
from __future__ import annotations

import importlib.util
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO_ROOT, subprocess_env
from csi_dist.config import ConfigError, load_config
from csi_dist.faults import SLOW_BATCH_VARIABLE
from csi_dist.sweep.space import load_space, wandb_sweep
from csi_dist.sweep.study import SweepSettings, budget_used, finished_count, load_study
from csi_dist.train import hyperparameter_overrides

CI_SPACE = REPO_ROOT / "configs" / "sweep" / "phantom_ci.ini"
DEFAULT_SPACE = REPO_ROOT / "configs" / "sweep" / "default.yaml"
SWEEP_TIMEOUT_S = 300


# ------------------------------------------------------------------------------------------------ fast unit tests
def sample(space, numbers):
    study = optuna.create_study(direction=space.study_direction())
    drawn = []
    for number in numbers:
        study.sampler = space.sampler(number)
        trial = study.ask()
        drawn.append(space.suggest(trial))
        study.tell(trial, 0.5)
    return drawn


def test_default_space_is_the_seed_search_space_with_conditional_weight_decay_and_momentum():
    space = load_space(DEFAULT_SPACE)
    params = {p.name: p for p in space.params}
    assert space.objective == "f1_weighted" and space.study_direction() == "maximize"
    assert (params["optimization.learning_rate"].low, params["optimization.learning_rate"].high) == (1e-5, 1e-1)
    assert params["optimization.learning_rate"].log
    assert params["training.batch_size"].choices == [16, 32, 64, 128]
    assert (params["loss.unknown_weight"].low, params["loss.unknown_weight"].high) == (0.1, 1.0)
    assert params["optimization.optimizer"].choices == ["adam", "adamw", "sgd"]
    for overrides in sample(space, range(30)):
        optimizer = overrides["optimization.optimizer"]
        assert ("optimization.momentum" in overrides) == (optimizer == "sgd")
        if optimizer == "adam":
            assert overrides["optimization.weight_decay"] == 0.0
        else:
            assert 1e-6 <= overrides["optimization.weight_decay"] <= 1e-2
        load_config(REPO_ROOT / "configs" / "demo.ini", [f"{k}={v}" for k, v in overrides.items()])


def test_trials_are_seeded_by_number_so_parallel_workers_do_not_repeat_each_other():
    space = load_space(DEFAULT_SPACE)
    first, again = sample(space, [0, 1, 2]), sample(space, [0, 1, 2])
    assert first == again
    assert len({json.dumps(t, sort_keys=True) for t in first}) == 3


def test_ini_and_yaml_spaces_read_the_same(tmp_path: Path):
    yaml_path = tmp_path / "space.yaml"
    yaml_path.write_text("study: {objective: loss}\npruner: {name: hyperband, min_resource: 1}\nparams:\n"
                         "  optimization.optimizer: {choices: [adam, sgd]}\n"
                         "  optimization.momentum: {type: float, low: 0.5, high: 0.9, when: {optimization.optimizer: [sgd]}}\n")
    ini_path = tmp_path / "space.ini"
    ini_path.write_text("[study]\nobjective = loss\n[pruner]\nname = hyperband\nmin_resource = 1\n"
                        "[param optimization.optimizer]\nchoices = adam, sgd\n"
                        "[param optimization.momentum]\ntype = float\nlow = 0.5\nhigh = 0.9\n"
                        "when = optimization.optimizer: sgd\n")
    from_yaml, from_ini = load_space(yaml_path), load_space(ini_path)
    assert from_yaml.params == from_ini.params
    assert from_ini.study_direction() == "minimize"  # a loss is minimised
    assert isinstance(from_ini.pruner(n_epochs=9), optuna.pruners.HyperbandPruner)


@pytest.mark.parametrize("text, message", [
    ("params:\n  learning_rate: {type: float, low: 1, high: 2}\n", "must be written section.key"),
    ("params:\n  optimization.learning_rate: {type: float, low: 2, high: 1}\n", "needs low <= high"),
    ("params:\n  optimization.momentum: {type: float, low: 0.1, high: 0.2, when: {optimization.optimizer: [sgd]}}\n",
     "must be a parameter listed before it"),
    ("sampler: {name: cmaes}\nparams:\n  optimization.optimizer: {choices: [adam]}\n", "sampler.name"),
])
def test_bad_space_files_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_space(path)
    assert str(path) in str(error.value)


def test_searched_key_fixed_with_set_is_refused():
    with pytest.raises(ConfigError, match="both searched and fixed"):
        load_space(CI_SPACE).check_against_config(None, ["optimization.learning_rate=0.1"])


def test_budget_counts_a_retried_failure_once():
    study = optuna.create_study()
    study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=1.0))
    failed = optuna.create_trial(state=TrialState.FAIL)
    study.add_trial(failed)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, study.trials[1])
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert finished_count(trials) == 1 and budget_used(trials) == 2


def test_wandb_sweep_trial_applies_the_space_conditions():
    from csi_dist.sweep.wandb_agent import trial_overrides
    sampled = {"optimization.optimizer": "adam", "optimization.momentum": "0.7", "optimization.weight_decay": "0.01",
               "optimization.learning_rate": "0.001"}
    overrides = trial_overrides(DEFAULT_SPACE, sampled)
    assert "optimization.weight_decay=0.0" in overrides and not any("momentum" in o for o in overrides)


def test_wandb_sweep_definition_runs_the_wandb_agent_module():
    definition = wandb_sweep(load_space(DEFAULT_SPACE), None, ["training.n_epochs=3"], n_trials=5)
    command = definition["command"]
    module = command[command.index("-m") + 1]
    assert module == "csi_dist.sweep.wandb_agent" and importlib.util.find_spec(module) is not None
    assert (REPO_ROOT / definition["program"]).is_file()
    assert command[-3:] == ["--set", "training.n_epochs=3", "${args}"]


# ------------------------------------------------------------------------------------------------ real sweeps
@pytest.fixture(scope="module")
def phantom_shards(tmp_path_factory) -> Path:
    from csi_dist.data.shards import write_demo
    out = tmp_path_factory.mktemp("phantom") / "shards"
    write_demo(str(out), n_images=160, image_size=32, seed=1, workers=2)
    return out


def fixed_overrides(shards: Path) -> list[str]:
    return [f"data.shard_dir={shards}", "model.model_arch=Tiny_CNN", "data.image_size=32", "training.batch_size=8",
            "training.n_epochs=3",
            "training.num_workers=0"]


def sweep_command(shards: Path, sweep_dir: Path, n_trials: int, parallel: int, executor: str) -> list[str]:
    command = [sys.executable, "-m", "csi_dist.sweep", "--config", str(REPO_ROOT / "configs" / "demo.ini"),
               "--space", str(CI_SPACE), "--n-trials", str(n_trials), "--parallel", str(parallel),
               "--executor", executor, "--sweep-dir", str(sweep_dir), "--poll-s", "2", "--dead-grace-s", "20",
               "--wait-timeout-min", str(SWEEP_TIMEOUT_S / 60)]
    if executor == "slurm":
        command += ["--cpus-per-task", "1", "--timeout-min", "10"]
    for override in fixed_overrides(shards):
        command += ["--set", override]
    return command


def run_sweep(command: list[str], timeout: float = SWEEP_TIMEOUT_S) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"sweep failed ({result.returncode}):\n{result.stderr[-4000:]}"
    return result


def study_trials(sweep_dir: Path) -> list[optuna.trial.FrozenTrial]:
    settings = SweepSettings.load(sweep_dir)
    return load_study(settings, load_space(settings.space)).get_trials()


def assert_best_params_reproduce(sweep_dir: Path, shards: Path, tmp_path: Path) -> None:
    """Training again with --hyperparams best_params.json gives the best trial's history and value."""
    best = json.loads((sweep_dir / "best_params.json").read_text())
    assert set(best["best_params"]) == {"optimization.learning_rate", "loss.unknown_weight"}
    load_config(REPO_ROOT / "configs" / "demo.ini", hyperparameter_overrides(sweep_dir / "best_params.json"))
    final = tmp_path / "final"
    command = [sys.executable, "-m", "csi_dist.train", "--config", str(REPO_ROOT / "configs" / "demo.ini"),
               "--hyperparams", str(sweep_dir / "best_params.json"), "--run-dir", str(final)]
    for override in fixed_overrides(shards):
        command += ["--set", override]
    result = subprocess.run(command, env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    retrained = [r["val_f1_weighted"] for r in json.loads((final / "training_history.json").read_text())]
    trial_run = sweep_dir / "trials" / f"trial-{best['best_trial']:04d}"
    in_sweep = [r["val_f1_weighted"] for r in json.loads((trial_run / "training_history.json").read_text())]
    assert retrained == pytest.approx(in_sweep, abs=1e-9)
    assert max(retrained) == pytest.approx(best["best_value"], abs=1e-9)
    # the best trial's lineage travels with its parameters: the data it saw and the code that trained it
    origin = best["provenance"]["origin"]
    assert origin["data"]["manifest_sha256"] == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert origin["code"] == json.loads((trial_run / "provenance.json").read_text())["origin"]["code"]
    assert best["provenance"]["segments"] and best["provenance"]["segments"][-1]["outcome"] != "running"


def assert_sweep_outputs(sweep_dir: Path, n_trials: int) -> list[optuna.trial.FrozenTrial]:
    trials = study_trials(sweep_dir)
    assert [t.number for t in trials] == list(range(n_trials))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), \
        [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    for t in trials:  # every trial trained in its own run dir and reported each epoch it ran
        history = json.loads((sweep_dir / "trials" / f"trial-{t.number:04d}" / "training_history.json").read_text())
        assert sorted(t.intermediate_values) == [r["epoch"] for r in history]
        assert list(t.intermediate_values.values()) == pytest.approx([r["val_f1_weighted"] for r in history])
        assert (sweep_dir / "trials" / f"trial-{t.number:04d}" / "wandb").is_dir()
    report = (sweep_dir / "report.md").read_text()
    assert "| trial | state |" in report and "--hyperparams" in report
    assert (sweep_dir / "optimization_history.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "wandb_sweep.yaml").is_file()
    return trials


@pytest.mark.slow
def test_local_sweep_completes_and_its_best_params_retrain_to_the_same_metric(phantom_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_sweep(sweep_command(phantom_shards, sweep_dir, n_trials=3, parallel=2, executor="local"))
    assert_sweep_outputs(sweep_dir, 3)
    assert_best_params_reproduce(sweep_dir, phantom_shards, tmp_path)


def slurm_problem() -> str | None:
    from slurm_helpers import cluster_problem
    return cluster_problem()


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_sweep_survives_a_killed_driver_prunes_and_writes_reproducible_best_params(phantom_shards, tmp_path):
    if problem := slurm_problem():
        pytest.skip(problem)
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(phantom_shards, sweep_dir, n_trials=6, parallel=2, executor="slurm")
    driver = subprocess.Popen(command, env=subprocess_env(), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (sweep_dir / "sweep.json").exists() and
                   finished_count(study_trials(sweep_dir)) >= 1, SWEEP_TIMEOUT_S, "a first finished trial")
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies without warning; the trial jobs go on
        driver.wait(timeout=30)
    jobs_before = json.loads((sweep_dir / "jobs.json").read_text())
    try:
        run_sweep(command)  # the same command continues the same study
    except BaseException:
        cancel_sweep_jobs(sweep_dir)
        raise
    trials = assert_sweep_outputs(sweep_dir, 6)
    assert json.loads((sweep_dir / "jobs.json").read_text()) == jobs_before, "the restarted driver resubmitted jobs"
    assert optuna.study.get_all_study_names(load_study_storage(sweep_dir)) == [sweep_dir.name]
    assert sum(t.state == TrialState.PRUNED for t in trials) >= 1
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= 1
    assert all(t.user_attrs["owner"].startswith("slurm-") for t in trials)
    assert_best_params_reproduce(sweep_dir, phantom_shards, tmp_path)


def cancel_sweep_jobs(sweep_dir: Path) -> None:
    """After a failed test: cancel exactly this sweep's jobs (other tests may share the cluster)."""
    jobs_file = sweep_dir / "jobs.json"
    ids = [job["owner"].removeprefix("slurm-") for job in json.loads(jobs_file.read_text())] if jobs_file.exists() else []
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


def start_driver(command: list[str], slow_batch_s: float = 0.0) -> subprocess.Popen:
    """`slow_batch_s`: each loader batch of the trials held back (csi_dist/faults.py), so that a signal sent after the
    first checkpoint lands before a Tiny_CNN trial has run its 45 steps to the end."""
    return subprocess.Popen(command, env=subprocess_env(**{SLOW_BATCH_VARIABLE: str(slow_batch_s)}), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_first_complete_checkpoint(trial_dir: Path) -> None:
    """A kill must not land while the first checkpoint is still a .partial directory: nothing to resume then."""
    checkpoints = trial_dir / "checkpoints"
    wait_until(lambda: checkpoints.is_dir() and any(re.fullmatch(r"step-\d{8}", path.name)
                                                    for path in checkpoints.iterdir()),
               SWEEP_TIMEOUT_S, "the trial's first complete checkpoint")


def load_study_storage(sweep_dir: Path):
    from csi_dist.sweep.study import open_storage
    return open_storage(SweepSettings.load(sweep_dir))


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preempted_trial_is_requeued_and_resumes_from_its_checkpoint(phantom_shards, tmp_path):
    if problem := slurm_problem():
        pytest.skip(problem)
    from slurm_helpers import job_field
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(phantom_shards, sweep_dir, n_trials=1, parallel=1, executor="slurm")
    command += ["--set", "callbacks.preemption_check_every_steps=1"]
    driver = start_driver(command, slow_batch_s=0.15)
    try:
        wait_for_first_complete_checkpoint(sweep_dir / "trials" / "trial-0000")
        job = json.loads((sweep_dir / "jobs.json").read_text())[0]["owner"].removeprefix("slurm-")
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # Slurm's preemption notice
        wait_until(lambda: job_field(job, "Restarts") not in (None, "0"), 120, f"job {job} to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, timeout=30)
        output, _ = driver.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            cancel_sweep_jobs(sweep_dir)
    assert driver.returncode == 0, output[-4000:]
    [trial] = study_trials(sweep_dir)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["requeues"] == 1
    assert sorted(trial.intermediate_values) == [0, 1, 2]
    log = "".join(path.read_text() for path in (sweep_dir / "submitit").rglob("*_log.err"))
    assert "resumes its trial 0" in log and "resumed from" in log


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_trial_whose_job_dies_is_failed_and_retried_from_its_checkpoints(phantom_shards, tmp_path):
    if problem := slurm_problem():
        pytest.skip(problem)
    sweep_dir = tmp_path / "sweep"
    command = sweep_command(phantom_shards, sweep_dir, n_trials=1, parallel=1, executor="slurm")
    command[command.index("--dead-grace-s") + 1] = "5"
    driver = start_driver(command, slow_batch_s=0.15)
    try:
        wait_for_first_complete_checkpoint(sweep_dir / "trials" / "trial-0000")
        marker = f"submitit.core._submit {sweep_dir}"
        ps = subprocess.run(["ps", "-ww", "-eo", "pid=,comm=,args="], capture_output=True, text=True, timeout=30).stdout
        [pid] = [int(line.split()[0]) for line in ps.splitlines() if marker in line and line.split()[1] != "srun"]
        os.kill(pid, signal.SIGKILL)  # the trial process dies without a word: no tell, no requeue
        output, _ = driver.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            cancel_sweep_jobs(sweep_dir)
    assert driver.returncode == 0, output[-4000:]
    dead, retry = study_trials(sweep_dir)
    assert dead.state == TrialState.FAIL and "ended without reporting" in dead.user_attrs["fail_reason"]
    assert retry.state == TrialState.COMPLETE and retry.system_attrs["failed_trial"] == 0
    assert retry.user_attrs["overrides"] == dead.user_attrs["overrides"]
    log = "".join(path.read_text() for path in (sweep_dir / "submitit").rglob("*_log.err"))
    assert "trial 1 retries trial 0 from its checkpoints" in log and "resumed from" in log
