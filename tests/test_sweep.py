"""Sweeps: search-space files, trial budget, best_params.json for the trainer, and a real local sweep (the SLURM
sweeps are in tests/test_slurm_sweep.py).

The end-to-end sweeps train Tiny_CNN on a 160-image phantom at 32 px for 3 epochs per trial, with the CI space
(configs/sweep/phantom_ci.ini): its sampler is random and seeded by trial number, and half its learning rates are
too small to learn, so the median pruner stops some trials whichever job runs them.
"""
from __future__ import annotations

import configparser
import csv
import importlib.util
import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.config import ConfigError, load_config
from csi_dist.tuning.space import load_space, wandb_sweep
from csi_dist.tuning.study import SweepSettings, budget_used, finished_count, load_study
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
    # issue 30: bad YAML, wrong types and infinite bounds are named, never a traceback
    ("params:\n  optimization.optimizer: {choices: [adam, sgd}\n", r"line 2, column \d+: not valid YAML"),
    ("params:\n  optimization.learning_rate: {type: float, low: 0.1, high: 0.2}\n"
     "  optimization.learning_rate: {type: float, low: 0.3, high: 0.4}\n",
     "line 3, column 3: not valid YAML: key 'optimization.learning_rate' appears twice"),
    ("params: [optimization.learning_rate]\n", "params must be a mapping"),
    ("study: f1_weighted\nparams:\n  optimization.optimizer: {choices: [adam]}\n", "study must be a mapping"),
    ("params:\n  optimization.learning_rate: 0.1\n", "parameter 'optimization.learning_rate' must be a mapping"),
    ("params:\n  optimization.learning_rate: {type: float, low: 1.0e-5, high: .inf}\n",
     "parameter 'optimization.learning_rate': high must be a finite number, got inf"),
    ("params:\n  optimization.learning_rate: {type: float, low: -1.0e+400, high: 1}\n",
     "low must be a finite number, got -inf"),
    ("params:\n  optimization.learning_rate: {type: float, low: small, high: 1}\n",
     "low must be a number, got 'small'"),
    ("params:\n  training.batch_size: {type: int, low: 8, high: 64.5}\n", "high must be an integer, got 64.5"),
    ("params:\n  optimization.learning_rate: {type: float, low: 0, high: 1, log: true}\n", "log needs low > 0"),
    ("params:\n  optimization.learning_rate: {type: float, low: 0.1, high: 1, log: maybe}\n",
     "log must be true or false, got 'maybe'"),
    ("params:\n  training.batch_size: {choices: 16}\n", "choices must be a list"),
    ("params:\n  loss.unknown_weight: {choices: [0.1, .nan]}\n", "choices must be a finite number, got nan"),
    ("sampler: {seed: .inf}\nparams:\n  optimization.optimizer: {choices: [adam]}\n",
     "sampler.seed must be a finite number, got inf"),
    ("sampler: {n_startup_tirals: 3}\nparams:\n  optimization.optimizer: {choices: [adam]}\n",
     "sampler: .*n_startup_tirals"),
    ("pruner: {n_warmup_steps: -1}\nparams:\n  optimization.optimizer: {choices: [adam]}\n", "pruner: "),
])
def test_bad_space_files_name_the_file_and_the_problem(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_space(path)
    assert str(path) in str(error.value)


def test_bad_space_file_encodings_ini_duplicates_and_config_refusals_are_named(tmp_path: Path, caplog):
    windows = tmp_path / "windows.yaml"  # a cp1252 comment, as Windows editors save it: read, with a warning
    windows.write_bytes("# Schrittweite für die Lernrate\nparams:\n  optimization.optimizer: {choices: [adam]}\n"
                        .encode("cp1252"))
    assert load_space(windows).params[0].choices == ["adam"]
    assert f"{windows}: not valid UTF-8 (byte b'\\xfc' on line 1); read as cp1252" in caplog.text
    duplicate = tmp_path / "duplicate.ini"
    duplicate.write_text("[param optimization.learning_rate]\ntype = float\nlow = 0.1\nlow = 0.2\nhigh = 1\n")
    infinite = tmp_path / "infinite.ini"
    infinite.write_text("[param training.batch_size]\ntype = int\nlow = 1\nhigh = inf\n")
    negative = tmp_path / "negative.yaml"  # a bound the space accepts but the config refuses
    negative.write_text("params:\n  training.batch_size: {type: int, low: 0, high: 8}\n")
    for refused, message in (
            (lambda: load_space(duplicate), f"{duplicate}: line 4: key 'low' appears twice in [param "),
            (lambda: load_space(infinite), f"{infinite}: parameter 'training.batch_size': high must be a finite"),
            (lambda: load_space(tmp_path / "absent.yaml"), f"search-space file not found: {tmp_path / 'absent.yaml'}"),
            (lambda: load_space(negative).check_against_config(None, []),
             f"{negative}: parameter 'training.batch_size' takes 0, which the config refuses: override "
             f"'training.batch_size=0': 0 is out of range; training.batch_size must be >= 1")):
        with pytest.raises(ConfigError) as error:
            refused()
        assert str(error.value).startswith(message), str(error.value)


def test_the_wandb_agent_refuses_a_damaged_space_file_with_exit_2(tmp_path: Path, capsys):
    from csi_dist.tuning.wandb_agent import main
    space = tmp_path / "space.yaml"
    space.write_text("params:\n  optimization.learning_rate: {type: float, low: 1.0e-5, high: .inf}\n")
    with pytest.raises(SystemExit) as stop:
        main(["--space", str(space), "--optimization.learning_rate=0.1"])
    assert stop.value.code == 2
    assert f"{space}: parameter 'optimization.learning_rate': high must be a finite number" in capsys.readouterr().err


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
    from csi_dist.tuning.wandb_agent import trial_overrides
    sampled = {"optimization.optimizer": "adam", "optimization.momentum": "0.7", "optimization.weight_decay": "0.01",
               "optimization.learning_rate": "0.001"}
    overrides = trial_overrides(DEFAULT_SPACE, sampled)
    assert "optimization.weight_decay=0.0" in overrides and not any("momentum" in o for o in overrides)


# ------------------------------------------------------------------------------------------------ the command line
def test_help_shows_every_default_in_words_and_answers_without_torch():
    program = ("import sys\nfrom csi_dist.sweep import main\ntry:\n    main(['--help'])\n"
               "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", program], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("torch imported: False")
    text = " ".join(result.stdout.split())
    for shown in ("--n-trials N trials in the whole sweep (default: 50)",
                  "--parallel N trials running at the same time (default: 4)",
                  "--max-retries N retries of a trial whose job died (default: 2)",
                  "Default: slurm where this machine can submit jobs (sbatch on PATH and the SLURM controller "
                  "answers `scontrol ping`), otherwise local"):
        assert shown in text, shown
    options = result.stdout.split("options:")[1].split("\n\n")[0]
    entries = re.split(r"\n  (?=-)", options)
    described = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.strip()}
    assert {"--executor", "--n-trials", "--parallel", "--timeout-min", "--poll-s"} <= set(described)
    undescribed = [name for name, entry in described.items() if name != "-h" and "default" not in entry.lower()]
    assert not undescribed, f"options whose help hides the default: {undescribed}"


def fake_slurm_commands(bin_dir: Path, ping_output: str | None) -> None:
    """sbatch and `scontrol ping` as a login node has them; ping_output None = no SLURM commands at all."""
    bin_dir.mkdir()
    if ping_output is None:
        return
    ping_status = 0 if "UP" in ping_output else 1  # scontrol ping fails when no controller answers
    for name, body in (("sbatch", "exit 0"), ("scontrol", f"echo '{ping_output}'; exit {ping_status}")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


@pytest.mark.parametrize("ping_output, expected", [
    (None, ("local", "no sbatch on PATH")),
    ("Slurmctld(primary) at ctl is DOWN", ("local", "no SLURM controller answers")),
    ("Slurmctld(primary) at ctl is UP", ("slurm", "the SLURM controller answers")),
])
def test_the_executor_defaults_to_slurm_only_where_a_slurm_controller_answers(tmp_path, monkeypatch, ping_output,
                                                                               expected):
    from csi_dist.sweep import parse_args
    from csi_dist.tuning.driver import choose_executor
    fake_slurm_commands(tmp_path / "bin", ping_output)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    executor, reason = choose_executor(parse_args([]), stored=None)
    assert executor == expected[0] and expected[1] in reason
    # what the user asked for, or what a restarted sweep started with, wins over the probe
    assert choose_executor(parse_args(["--executor", "slurm"]), stored="local")[0] == "slurm"
    assert choose_executor(parse_args([]), stored="slurm")[0] == "slurm"


def test_a_multi_node_sweep_without_slurm_is_refused_naming_the_executor(tmp_path, monkeypatch, caplog):
    from csi_dist.sweep import main
    fake_slurm_commands(tmp_path / "bin", None)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    code = main(["--space", str(CI_SPACE), "--sweep-dir", str(tmp_path / "sweep"), "--nodes", "2"])
    assert code == 2
    assert ("trials of several processes (--nodes 2, --tasks-per-node None) need --executor slurm; the executor is "
            "local (default here: no sbatch on PATH") in caplog.text
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_progress_speaks_only_when_a_trial_changes(tmp_path):
    from csi_dist.tuning.console import TrialEvents
    settings = SweepSettings(sweep_dir=str(tmp_path), study_name="s", config=None, overrides=[], space=str(CI_SPACE),
                             n_trials=2, parallel=2, executor="local")
    events = TrialEvents(settings, load_space(CI_SPACE))
    study = optuna.create_study(direction="maximize")
    assert events.lines(study.get_trials()) == []  # a new study: nothing to say yet
    trial = study.ask()
    assert events.lines(study.get_trials()) == []  # its job has not recorded the parameters yet
    trial.set_user_attr("overrides", {"optimization.learning_rate": 0.003})
    trial.set_user_attr("owner", "local-host-1")
    assert events.lines(study.get_trials()) == [
        "trial 0 started (job local-host-1): optimization.learning_rate=0.003; 0/2 finished, 1 running"]
    assert events.lines(study.get_trials()) == events.lines(study.get_trials()) == []
    trial.report(0.25, step=0)
    assert events.lines(study.get_trials()) == []  # an epoch's report is no trial event
    study.tell(trial, 0.5)
    assert events.lines(study.get_trials()) == [
        "trial 0 complete: val_f1_weighted = 0.5; 1/2 finished, 0 running, best 0.5 (trial 0)"]
    assert events.lines(study.get_trials()) == []


def test_wandb_sweep_definition_runs_the_wandb_agent_module():
    definition = wandb_sweep(load_space(DEFAULT_SPACE), None, ["training.n_epochs=3"], n_trials=5)
    command = definition["command"]
    module = command[command.index("-m") + 1]
    assert module == "csi_dist.tuning.wandb_agent" and importlib.util.find_spec(module) is not None
    assert (REPO_ROOT / definition["program"]).is_file()
    assert command[-3:] == ["--set", "training.n_epochs=3", "${args}"]


# ------------------------------------------------------------------------------------------------ real sweeps
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


def console_messages(stderr: str) -> list[str]:
    """The driver's log messages without their time stamps."""
    return [match.group(1) for match in re.finditer(r"^\S+ \S+ csi_dist\.sweep[\w.]*: (.*)$", stderr, re.MULTILINE)]


def numbers_in(text: str) -> list[float]:
    return [float(number) for number in re.findall(r"-?\d+(?:\.\d*)?(?:e[-+]?\d+)?", text)]


def assert_sweep_console(stderr: str, sweep_dir: Path, trials: list[optuna.trial.FrozenTrial]) -> None:
    """Opening summary, a line per trial event (never the same line twice), the best result and its command."""
    messages = console_messages(stderr)
    assert messages[0] == f"starting sweep 'sweep' in {sweep_dir}"
    assert "  objective: val_f1_weighted, maximize (the best over each trial's epochs)" in messages
    ini = configparser.ConfigParser()
    ini.read(CI_SPACE)
    for section in (name for name in ini.sections() if name.startswith("param ")):
        name = section.removeprefix("param ")
        expected = ([float(v) for v in ini[section]["choices"].split(",")] if "choices" in ini[section] else
                    [float(ini[section]["low"]), float(ini[section]["high"])])
        [line] = [m for m in messages if m.startswith(f"    {name}: ")]
        assert numbers_in(line.split(": ", 1)[1]) == pytest.approx(expected), line
    assert "  trials: 3, at most 2 at a time" in messages and "  executor: local (--executor)" in messages
    repeated = [message for message, count in Counter(messages).items() if count > 1]
    assert not repeated, f"the console repeats itself: {repeated}"
    assert not [m for m in messages if "job(s) active" in m]
    for t in trials:  # each trial's end, once, with the study's own number
        if t.state == TrialState.COMPLETE:
            end = f"trial {t.number} complete: val_f1_weighted = {t.value:.6g}"
        else:
            end = f"trial {t.number} pruned after epoch {t.last_step}: val_f1_weighted = " \
                  f"{t.intermediate_values[t.last_step]:.6g}"
        assert sum(m.startswith(end + ";") or m.startswith(end + " (") for m in messages) == 1, (end, messages)
    best = json.loads((sweep_dir / "best_params.json").read_text())
    report = (sweep_dir / "report.md").read_text()
    retrain = report.split("```\n")[1].strip()
    assert messages[-4:] == [f"best val_f1_weighted = {best['best_value']:.6f} (trial {best['best_trial']})",
                             messages[-3], f"train them: {retrain}", f"report: {sweep_dir / 'report.md'}"]
    shown = dict(pair.split("=", 1) for pair in messages[-3].removeprefix("best parameters: ").split(", "))
    assert shown.keys() == best["best_params"].keys()
    assert [float(shown[key]) for key in shown] == pytest.approx(list(best["best_params"].values()), rel=1e-5)
    assert f"--hyperparams {sweep_dir / 'best_params.json'}" in retrain


def assert_trials_csv_and_history_ticks(sweep_dir: Path, trials: list[optuna.trial.FrozenTrial]) -> None:
    """trials.csv is ';'-separated as every CSV of the package; the history plot ticks whole trial numbers."""
    with open(sweep_dir / "trials.csv", newline="", encoding="utf-8") as handle:
        assert handle.readline().startswith("trial;state;value;")
        handle.seek(0)
        rows = list(csv.DictReader(handle, delimiter=";"))
    assert {int(row["trial"]): row["state"] for row in rows} == {t.number: t.state.name for t in trials}
    assert [json.loads(row["params"]) for row in rows] == [t.user_attrs["overrides"] for t in trials]
    from csi_dist.tuning.report import history_figure
    settings = SweepSettings.load(sweep_dir)
    figure = history_figure(load_study(settings, load_space(settings.space)), "f1_weighted")
    low, high = figure.axes[0].get_xlim()
    ticks = [tick for tick in figure.axes[0].get_xticks() if low <= tick <= high]
    assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks


@pytest.mark.slow
def test_local_sweep_completes_and_its_best_params_retrain_to_the_same_metric(phantom_shards, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(sweep_command(phantom_shards, sweep_dir, n_trials=3, parallel=2, executor="local"))
    trials = assert_sweep_outputs(sweep_dir, 3)
    assert_sweep_console(result.stderr, sweep_dir, trials)
    assert_trials_csv_and_history_ticks(sweep_dir, trials)
    assert_best_params_reproduce(sweep_dir, phantom_shards, tmp_path)
