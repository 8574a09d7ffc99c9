"""Paired comparison of two runs on the same split: the bootstrap difference of each headline metric.

Both runs' `<split>_predictions.csv` (written by evaluate) are read back; they must hold the same images (FileIDs)
with the same targets. Each resample draws the same images (or the same patients, when the predictions carry
patient_id) for both runs, so the difference RUN_B - RUN_A is bootstrapped with its pairing. The interval is the
percentile interval of the resampled differences; the two-sided p-value is that of the test which rejects "no
difference" when the (1 - p) percentile interval excludes 0: p = min(1, 2 min(#{d <= 0} + 1, #{d >= 0} + 1) /
(R + 1)) over the R resamples where the metric is defined for both runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csi_dist.core.domain import (AHF_COLUMN, CLASS_NAMES, CSI_COLUMN, CSV_FLOAT_FORMAT, CSV_SEPARATOR, FILE_ID_COLUMN,
                                  METRIC_DIRECTIONS, PATIENT_COLUMN, ZONE_NAMES)
from csi_dist.evaluation.intervals import (SufficientStatistics, group_codes, percentile_interval, resampled_metrics)
from csi_dist.core.run_dir import RunDir

log = logging.getLogger(__name__)

HEADLINE_METRICS = ("f1_weighted", "f1_macro", "csi_mae", "csi_pearson_r", "ahf_accuracy", "ahf_auroc")
TABLE_COLUMNS = ("metric", "run_a", "run_b", "difference", "ci_low", "ci_high", "p_value", "better")


class CompareError(ValueError):
    """Predictions that cannot be compared: missing, unreadable, or not the same images and targets."""


@dataclass
class RunPredictions:
    path: Path
    file_ids: list[str]
    zone_probs: np.ndarray
    zone_targets: np.ndarray
    csi_truth: np.ndarray | None
    ahf_truth: np.ndarray | None
    patient_ids: list[str | None] | None


def predictions_path(run: Path, split: str) -> Path:
    """The predictions CSV of `split` for a run directory, its evaluation folder, or the CSV itself."""
    run = Path(run)
    for candidate in (run, RunDir(run).evaluation / f"{split}_predictions.csv", run / f"{split}_predictions.csv"):
        if candidate.is_file():
            return candidate
    raise CompareError(f"{run}: no {split}_predictions.csv there or in {RunDir(run).evaluation}; run "
                       f"`python -m csi_dist.evaluate --run-dir {run} --splits {split}` first")


def read_predictions(path: Path) -> RunPredictions:
    """The probabilities, targets, CSV truths and patients of an evaluate predictions CSV."""
    import pandas as pd
    try:
        table = pd.read_csv(path, sep=CSV_SEPARATOR, dtype={FILE_ID_COLUMN: str, PATIENT_COLUMN: str})
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise CompareError(f"{path}: not a readable predictions CSV: {error}") from None
    prob_columns = [f"{zone}_p_{name}" for zone in ZONE_NAMES for name in CLASS_NAMES]
    target_columns = [f"{zone}_true" for zone in ZONE_NAMES]
    missing = [column for column in (FILE_ID_COLUMN, *target_columns, *prob_columns) if column not in table]
    if missing:
        raise CompareError(f"{path}: not an evaluate predictions CSV, missing column(s) {', '.join(missing[:6])}")
    n_images = len(table)
    patients = None
    if PATIENT_COLUMN in table:
        patients = [None if isinstance(value, float) else str(value) for value in table[PATIENT_COLUMN]]
    return RunPredictions(
        path=path, file_ids=table[FILE_ID_COLUMN].astype(str).tolist(),
        zone_probs=table[prob_columns].to_numpy(float).reshape(n_images, len(ZONE_NAMES), len(CLASS_NAMES)),
        zone_targets=table[target_columns].to_numpy(),
        csi_truth=table[CSI_COLUMN].to_numpy(float) if CSI_COLUMN in table else None,
        ahf_truth=table[AHF_COLUMN].to_numpy(float) if AHF_COLUMN in table else None,
        patient_ids=patients)


def paired(run_a: RunPredictions, run_b: RunPredictions) -> RunPredictions:
    """run_b's predictions in run_a's image order, after checking both hold the same images and targets."""
    ids_a, ids_b = set(run_a.file_ids), set(run_b.file_ids)
    if len(ids_a) != len(run_a.file_ids) or len(ids_b) != len(run_b.file_ids):
        raise CompareError(f"{run_a.path if len(ids_a) != len(run_a.file_ids) else run_b.path}: a FileID appears twice")
    if ids_a != ids_b:
        only_a, only_b = sorted(ids_a - ids_b), sorted(ids_b - ids_a)
        raise CompareError(f"{run_a.path} and {run_b.path} do not hold the same images: {len(only_a)} FileID(s) only "
                           f"in the first (e.g. {only_a[:3]}), {len(only_b)} only in the second (e.g. {only_b[:3]}); "
                           f"compare runs evaluated on the same split of the same shards")
    position = {file_id: index for index, file_id in enumerate(run_b.file_ids)}
    order = np.array([position[file_id] for file_id in run_a.file_ids], dtype=np.int64)
    pick = lambda values: None if values is None else values[order]  # noqa: E731
    aligned = RunPredictions(run_b.path, run_a.file_ids, run_b.zone_probs[order], run_b.zone_targets[order],
                             pick(run_b.csi_truth), pick(run_b.ahf_truth),
                             None if run_b.patient_ids is None else [run_b.patient_ids[i] for i in order])
    differing = np.flatnonzero((aligned.zone_targets != run_a.zone_targets).any(axis=1))
    for name, first, second in (("csi", run_a.csi_truth, aligned.csi_truth), ("ahf", run_a.ahf_truth,
                                                                               aligned.ahf_truth)):
        if (first is None) != (second is None):
            raise CompareError(f"column {name!r} is in only one of {run_a.path} and {run_b.path}")
        if first is not None:
            differing = np.union1d(differing, np.flatnonzero(~np.isclose(first, second, equal_nan=True)))
    if differing.size:
        raise CompareError(f"{run_a.path} and {run_b.path} hold different targets for {differing.size} image(s), "
                           f"e.g. FileID {run_a.file_ids[differing[0]]}: not the same labels")
    return aligned


def compare_predictions(run_a: RunPredictions, run_b: RunPredictions, n_resamples: int = 1000, seed: int = 0,
                        level: float = 0.95) -> tuple[list[dict], dict]:
    """(one row per headline metric defined in both runs, settings): estimates of A and B, difference B - A, its
    interval and two-sided p-value (module docstring), and which run is better."""
    run_b = paired(run_a, run_b)
    datasets = [SufficientStatistics(run.zone_probs, run.zone_targets, run.csi_truth, run.ahf_truth)
                for run in (run_a, run_b)]
    patients = run_a.patient_ids
    groups = patients if patients is not None and any(patient is not None for patient in patients) else None
    units, n_units = group_codes(groups, len(run_a.file_ids))
    estimates = [dataset.metrics(np.ones((1, len(run_a.file_ids)))) for dataset in datasets]
    resampled = resampled_metrics(datasets, units, n_units, n_resamples, seed)
    rows = []
    for key in HEADLINE_METRICS:
        if key not in estimates[0]:
            continue
        value_a, value_b = float(estimates[0][key][0]), float(estimates[1][key][0])
        differences = resampled[1][key] - resampled[0][key]
        (low, high), defined = percentile_interval(differences, level)
        finite = differences[np.isfinite(differences)]
        p_value = math.nan
        if not math.isnan(low):
            tail = min(np.sum(finite <= 0), np.sum(finite >= 0)) + 1
            p_value = min(1.0, 2 * tail / (finite.size + 1))
        difference = value_b - value_a
        better = "neither"  # also where the interval holds 0: the data do not tell the runs apart
        if not math.isnan(difference) and difference != 0 and not (math.isnan(low) or low <= 0 <= high):
            b_wins = (difference > 0) == (METRIC_DIRECTIONS[key] == "max")
            better = "B" if b_wins else "A"
        rows.append({"metric": key, "run_a": value_a, "run_b": value_b, "difference": difference, "ci_low": low,
                     "ci_high": high, "p_value": p_value, "better": better, "defined_resamples": defined})
    settings = {"n_resamples": n_resamples, "seed": seed, "level": level, "n_images": len(run_a.file_ids),
                "resampled": "patients" if groups is not None else "images", "n_resampled_units": n_units,
                "run_a": str(run_a.path), "run_b": str(run_b.path)}
    return rows, settings


def format_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table (also what the command prints)."""
    lines = ["| metric | run A | run B | B - A (95% CI) | p | better |", "|---|---|---|---|---|---|"]
    for row in rows:
        low, high = row["ci_low"], row["ci_high"]
        interval = "n/a" if math.isnan(low) else f"{low:+.3f} to {high:+.3f}"
        lines.append(f"| {row['metric']} | {_number(row['run_a'])} | {_number(row['run_b'])} | "
                     f"{_number(row['difference'], '+.3f')} ({interval}) | {_p_text(row)} | {row['better']} |")
    return "\n".join(lines) + "\n"


def _p_text(row: dict) -> str:
    """The p-value, "<= 2/(R+1)" at the smallest value R resamples can give."""
    p_value, floor = row["p_value"], 2 / (row["defined_resamples"] + 1)
    if math.isnan(p_value):
        return "n/a"
    return f"<= {floor:.2g}" if p_value <= floor * (1 + 1e-9) else f"{p_value:.3g}"


def _number(value: float, spec: str = ".3f") -> str:
    return "n/a" if math.isnan(value) else format(value, spec)


def write_comparison(rows: list[dict], settings: dict, out_dir: Path, split: str) -> dict[str, Path]:
    """comparison_<split>.csv (;), .md and .png in out_dir; returns their paths by kind."""
    import pandas as pd
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / f"comparison_{split}.{kind}" for kind in ("csv", "md", "png")}
    pd.DataFrame(rows, columns=[*TABLE_COLUMNS, "defined_resamples"]).to_csv(
        paths["csv"], sep=CSV_SEPARATOR, index=False, float_format=CSV_FLOAT_FORMAT)
    unit = settings["resampled"]
    paths["md"].write_text(
        f"# Paired comparison on split `{split}`\n\nRun A: `{settings['run_a']}`  \nRun B: `{settings['run_b']}`\n\n"
        f"Difference B - A with its {settings['level']:.0%} percentile interval over {settings['n_resamples']} "
        f"paired bootstrap resamples of the {settings['n_resampled_units']} {unit} (seed {settings['seed']}; both "
        f"runs on the same resampled {unit}); p two-sided, from the resampled differences (the smallest it can be "
        f"is 2/(resamples + 1)). \"better\": the run whose estimate is better (csi_mae: lower) where the interval of the "
        f"difference excludes 0, else neither.\n\n"
        f"{format_table(rows)}\n![differences]({paths['png'].name})\n")
    _difference_figure(rows, settings, split, paths["png"])
    return paths


def _difference_figure(rows: list[dict], settings: dict, split: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(7.6, 1.4 + 0.55 * max(len(rows), 1)))
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.24, right=0.77, bottom=0.85 / figure.get_figheight(),
                           top=1 - 0.4 / figure.get_figheight())
    axes = figure.add_subplot()
    positions = np.arange(len(rows))[::-1]
    for position, row in zip(positions, rows):
        if math.isnan(row["difference"]):
            continue
        low, high = row["ci_low"], row["ci_high"]
        error = None if math.isnan(low) else [[row["difference"] - low], [high - row["difference"]]]
        color = {"A": "tab:orange", "B": "tab:blue"}.get(row["better"], "grey")
        axes.errorbar(row["difference"], position, xerr=error, fmt="o", color=color, capsize=4)
        p_value = _p_text(row)
        p_value = p_value if p_value.startswith("<=") or p_value == "n/a" else f"= {p_value}"
        axes.annotate(f"p {p_value.replace('<=', '≤')}, better: {row['better']}", xy=(1.02, position),
                      xycoords=("axes fraction", "data"), va="center", fontsize="small")
    axes.axvline(0, color="black", linewidth=1, linestyle="--")
    axes.set_yticks(positions, [row["metric"] + (" (lower better)" if METRIC_DIRECTIONS[row["metric"]] == "min"
                                                 else "") for row in rows])
    axes.set_ylim(-0.6, len(rows) - 0.4)
    axes.set_xlabel(f"difference run B - run A, {settings['level']:.0%} paired bootstrap interval\n"
                    "(each metric in its own units: csi_mae in grades)")
    axes.set_title(f"{split}: run B - run A, {settings['n_images']} images")
    figure.savefig(path, dpi=120)
