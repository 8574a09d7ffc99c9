"""What the sweep driver tells its user: the opening summary, one line per trial event, and the closing result.

The driver polls the study every ``--poll-s`` seconds, but it speaks only when something changed: a trial started,
completed, was pruned, failed or was queued for a retry. Each event line ends with the tally, so the last line on
screen always says how far the sweep is.
"""
from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from csi_dist.tuning.report import format_value, retrain_command
from csi_dist.tuning.space import SearchSpace
from csi_dist.tuning.study import SweepSettings, finished_count


def _params_text(params: dict) -> str:
    return ", ".join(f"{key}={format_value(value)}" for key, value in params.items())


def opening_lines(settings: SweepSettings, space: SearchSpace, executor_reason: str, resumed: bool) -> list[str]:
    """The sweep as it is about to run: what is searched, for what, where and how much."""
    sampler = space.sampler_settings.get("name", "tpe")
    pruner = space.pruner_settings.get("name", "median")
    lines = [f"{'resuming' if resumed else 'starting'} sweep {settings.study_name!r} in {settings.sweep_dir}",
             f"  objective: {space.history_key}, {space.study_direction()} (the best over each trial's epochs)",
             f"  search space: {len(space.params)} parameter(s) from {space.path}, sampler {sampler}, pruner {pruner}"]
    lines += [f"    {parameter.name}: {parameter.describe()}" for parameter in space.params]
    if settings.config or settings.overrides:
        lines.append(f"  every trial: config {settings.config or '(defaults)'}"
                     + "".join(f", {override}" for override in settings.overrides))
    lines += [f"  trials: {settings.n_trials}, at most {settings.parallel} at a time",
              f"  executor: {settings.executor} ({executor_reason})"]
    return lines


class TrialEvents:
    """Turns successive looks at the study into one line per change of a trial's state."""

    def __init__(self, settings: SweepSettings, space: SearchSpace):
        self.n_trials, self.key = settings.n_trials, space.history_key
        self.maximize = space.study_direction() == "maximize"
        self.seen: dict[int, TrialState] | None = None

    def lines(self, trials: list[optuna.trial.FrozenTrial]) -> list[str]:
        # a trial is RUNNING a moment before its job records its parameters: it is announced once they are there
        current = {t.number: t.state for t in trials
                   if t.state != TrialState.RUNNING or "overrides" in t.user_attrs}
        if self.seen is None:  # the first look (a resumed study): where it stands, in one line
            self.seen = current
            return [f"so far: {self.tally(trials)}"] if trials else []
        events = [self.event(t) for t in trials if t.number in current and self.seen.get(t.number) != t.state]
        was_unseen = {t.number for t in trials if t.number not in self.seen}
        self.seen = current
        tally = self.tally(trials)
        return [f"{line}{'' if number not in was_unseen or state == TrialState.RUNNING else params}; {tally}"
                for number, state, line, params in events]

    def event(self, t: optuna.trial.FrozenTrial) -> tuple[int, TrialState, str, str]:
        params = t.user_attrs.get("overrides", t.params)
        with_params = f" ({_params_text(params)})" if params else ""
        last = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
        if t.state == TrialState.RUNNING:
            line = f"trial {t.number} started (job {t.user_attrs.get('owner', '?')}): {_params_text(params)}"
        elif t.state == TrialState.COMPLETE:
            line = f"trial {t.number} complete: {self.key} = {format_value(t.value)}"
        elif t.state == TrialState.PRUNED:
            line = f"trial {t.number} pruned after epoch {t.last_step}: {self.key} = {format_value(last)}"
        elif t.state == TrialState.FAIL:
            line = f"trial {t.number} failed: {t.user_attrs.get('fail_reason') or 'no reason recorded'}"
        else:  # WAITING: a retry of a trial whose job died
            retry_of = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
            line = f"trial {t.number} queued: retries trial {retry_of} with the same parameters"
        return t.number, t.state, line, with_params

    def tally(self, trials: list[optuna.trial.FrozenTrial]) -> str:
        running = sum(t.state == TrialState.RUNNING for t in trials)
        text = f"{finished_count(trials)}/{self.n_trials} finished, {running} running"
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete:
            best = (max if self.maximize else min)(complete, key=lambda t: t.value)
            text += f", best {format_value(best.value)} (trial {best.number})"
        return text


def closing_lines(study: optuna.Study, settings: SweepSettings, space: SearchSpace,
                  best_params_path: Path | None) -> list[str]:
    """The result: best value, its parameters and the command that trains them (as report.md has them)."""
    sweep_dir = Path(settings.sweep_dir)
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(f"{sum(t.state == state for t in trials)} {word}" for state, word in (
        (TrialState.COMPLETE, "complete"), (TrialState.PRUNED, "pruned"), (TrialState.FAIL, "failed")))
    lines = [f"sweep {study.study_name!r} finished: {len(trials)} trial(s), {counts}"]
    if best_params_path is None:
        lines.append(f"no trial completed, so there are no best parameters; see {sweep_dir / 'report.md'}")
        return lines
    best = study.best_trial
    lines += [f"best {space.history_key} = {best.value:.6f} (trial {best.number})",  # as report.md writes it
              f"best parameters: {_params_text(best.user_attrs.get('overrides', best.params))}",
              f"train them: {retrain_command(settings, best_params_path)}",
              f"report: {sweep_dir / 'report.md'}"]
    return lines
