"""A finished sweep's outputs: best_params.json (for `csi_dist.train --hyperparams`), report.md, trials.csv, history plot."""
from __future__ import annotations

import csv
import json
import logging
import math
import shlex
from pathlib import Path

import optuna
from optuna.trial import TrialState

from csi_dist.core.domain import CSV_SEPARATOR
from csi_dist.core.files import atomic_write_json
from csi_dist.core.provenance import read_provenance

log = logging.getLogger(__name__)


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name,
                     "value": t.value if t.state == TrialState.COMPLETE else None,
                     "last_reported": t.intermediate_values[t.last_step] if t.last_step is not None else None,
                     "epochs_reported": len(t.intermediate_values), "requeues": t.user_attrs.get("requeues", 0),
                     "job": t.user_attrs.get("owner", ""),
                     "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
                     "retry_of": optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t),
                     "fail_reason": t.user_attrs.get("fail_reason", ""),
                     "params": t.user_attrs.get("overrides", t.params)})
    return rows


def retrain_command(settings, best_params_path: Path) -> str:
    words = ["python", "-m", "csi_dist.train"]
    if settings.config:
        words += ["--config", settings.config]
    for override in settings.overrides:
        words += ["--set", override]
    words += ["--hyperparams", str(best_params_path)]
    return shlex.join(words)


def history_figure(study: optuna.Study, objective: str):
    """The optimisation history: each trial's value and the best so far, one whole-number tick per trial shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    figure, axis = plt.subplots(figsize=(7, 4))
    styles = {TrialState.COMPLETE: ("o", "tab:blue", "complete (best value)"),
              TrialState.PRUNED: ("x", "tab:orange", "pruned (last reported)"),
              TrialState.FAIL: ("v", "tab:red", "failed (last reported)")}
    for state, (marker, color, label) in styles.items():
        points = [(t.number, t.value if state == TrialState.COMPLETE else t.intermediate_values[t.last_step])
                  for t in study.get_trials(deepcopy=False, states=(state,))
                  if state == TrialState.COMPLETE or t.last_step is not None]
        if points:
            axis.scatter(*zip(*points), marker=marker, color=color, label=label)
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    if complete:
        best, line = -math.inf if maximize else math.inf, []
        for t in complete:
            best = max(best, t.value) if maximize else min(best, t.value)
            line.append((t.number, best))
        axis.step(*zip(*line), where="post", color="tab:green", label="best so far")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # no trial 0.25
    axis.set_xlabel("trial")
    axis.set_ylabel(f"val {objective}")
    axis.set_title(f"optimisation history of {study.study_name}")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_history(study: optuna.Study, path: Path, objective: str) -> None:
    import matplotlib.pyplot as plt
    figure = history_figure(study, objective)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(study: optuna.Study, settings, space) -> Path | None:
    """Write the sweep's outputs into its directory; returns best_params.json's path (None without a complete trial)."""
    sweep_dir = Path(settings.sweep_dir)
    rows = _trial_rows(study)
    with open(sweep_dir / "trials.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"], delimiter=CSV_SEPARATOR)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "params": json.dumps(row["params"], sort_keys=True)})
    plot_history(study, sweep_dir / "optimization_history.png", space.objective)

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best_path = sweep_dir / "best_params.json"
    counts = {state.name: sum(r["state"] == state.name for r in rows)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"# Sweep {study.study_name}", "",
             f"Objective: best `val_{space.objective}` over each trial's evaluations ({study.direction.name.lower()}).",
             f"Trials: {len(rows)} ({', '.join(f'{n} {k.lower()}' for k, n in counts.items())}); "
             f"budget {settings.n_trials}; sweep dir `{sweep_dir}`.", ""]
    if complete:
        best = study.best_trial
        best_params = best.user_attrs.get("overrides", best.params)
        atomic_write_json(best_path, {
            "best_params": best_params, "best_value": best.value, "objective": space.objective,
            "direction": study.direction.name.lower(), "best_trial": best.number,
            "run_dir": best.user_attrs.get("run_dir"), "study_name": study.study_name,
            "n_trials": len(rows), "base_config": settings.config, "base_overrides": settings.overrides,
            # where the best model came from: code, packages, data and config hashes, job segments (its run's record)
            "provenance": read_provenance(Path(best.user_attrs["run_dir"])) if best.user_attrs.get("run_dir") else {}})
        lines += [f"**Best trial {best.number}**: val_{space.objective} = {best.value:.6f}", "",
                  "Parameters:", ""] + [f"- `{key}` = {format_value(value)}" for key, value in best_params.items()]
        lines += ["", "Train the final model with them:", "", "```", retrain_command(settings, best_path), "```", ""]
    else:
        lines += ["No trial completed, so there is no best_params.json.", ""]
        log.warning("%s: no complete trial; best_params.json not written", sweep_dir)
    lines += ["![optimisation history](optimization_history.png)", "",
              "| trial | state | value | last reported | epochs | requeues | job | params |",
              "|---:|---|---:|---:|---:|---:|---|---|"]
    for row in rows:
        params = ", ".join(f"{key}={format_value(value)}" for key, value in row["params"].items())
        note = f" (retry of {row['retry_of']})" if row["retry_of"] is not None else ""
        lines.append(f"| {row['trial']}{note} | {row['state']} | {format_value(row['value'] if row['value'] is not None else '')} | "
                     f"{format_value(row['last_reported'] if row['last_reported'] is not None else '')} | "
                     f"{row['epochs_reported']} | {row['requeues']} | {row['job']} | {params} |")
    failed = [row for row in rows if row["fail_reason"]]
    if failed:
        lines += ["", "Failures:", ""] + [f"- trial {row['trial']}: {row['fail_reason']}" for row in failed]
    (sweep_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return best_path if complete else None
