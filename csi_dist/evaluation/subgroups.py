"""Metrics per subgroup of a metadata column (site, sex, device, ...) with bootstrap intervals, and the flag of a
subgroup that does worse than the whole split.

A subgroup is every image with one value of a column (images without a value form the subgroup "(missing)"). It is
estimated when it has at least `min_images` images and `min_patients` patients (images without a patient id count as
patients of their own); otherwise it is named with its size and "too small to estimate", never left out.

A metric of an estimated subgroup is FLAGGED when its whole 95 % interval lies on the worse side of the overall
estimate of the split: wholly below it where a larger value is better (F1, accuracy, AUROC), wholly above it where a
smaller value is better (csi_mae, csi_rmse). Directions are domain.METRIC_DIRECTIONS (per-zone keys take their
suffix's); a metric without a direction is never flagged.

Files written by write_subgroups under out_dir:
    <split>_subgroups.csv   one row per (column, value, metric), separator domain.CSV_SEPARATOR: column; value;
                            n_images; n_patients; status ("estimated" or "too small to estimate"); metric; estimate;
                            ci_low; ci_high; overall; flag (1 when flagged). A too-small subgroup has one row with
                            the metric columns empty. Count metrics have no interval.
    and a "## Subgroups" section appended to <split>_report.md (key metrics, flags on those).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from csi_dist.core.domain import CSV_FLOAT_FORMAT, CSV_SEPARATOR, METRIC_DIRECTIONS

logger = logging.getLogger(__name__)

DEFAULT_MIN_IMAGES = 30
DEFAULT_MIN_PATIENTS = 10
MISSING_VALUE = "(missing)"
TOO_SMALL = "too small to estimate"
ESTIMATED = "estimated"
# the report's columns (and the metrics its flags are read on); the CSV has every metric
REPORT_METRICS = ("f1_weighted", "f1_macro", "accuracy", "csi_mae", "ahf_accuracy", "ahf_auroc")
CSV_COLUMNS = ("column", "value", "n_images", "n_patients", "status", "metric", "estimate", "ci_low", "ci_high",
               "overall", "flag")


class SubgroupError(ValueError):
    """A --by column the shards do not have."""


def check_columns(requested: Sequence[str], available: Sequence[str], where: str) -> None:
    """SubgroupError naming each requested column the shards lack, and the columns they have."""
    unknown = [column for column in requested if column not in available]
    if unknown:
        have = ", ".join(available) if available else "none (the label CSV had no extra columns)"
        raise SubgroupError(f"--by {', '.join(unknown)}: no such metadata column in {where}; its columns: {have}")


@dataclass(frozen=True)
class SubgroupOptions:
    """What `evaluate --by` asks: the columns, and the smallest subgroup that is estimated."""

    columns: tuple[str, ...] = ()
    min_images: int = DEFAULT_MIN_IMAGES
    min_patients: int = DEFAULT_MIN_PATIENTS
    n_resamples: int = 1000
    seed: int = 0


def check_shard_columns(shard_dir: str | Path, columns: Sequence[str]) -> None:
    """SubgroupError when the shards' manifest lacks one of `columns` (read as JSON: answered before torch loads;
    a missing or unreadable manifest is left to the reader, which names it)."""
    import json

    from csi_dist.data.metadata import manifest_metadata_columns
    from csi_dist.data.shards.format import MANIFEST_NAME
    manifest_path = Path(shard_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    check_columns(columns, manifest_metadata_columns(manifest), str(manifest_path))


def metric_direction(key: str) -> str | None:
    """"max", "min" or None for a compute_metrics key ("right_sup/f1_macro" takes f1_macro's)."""
    return METRIC_DIRECTIONS.get(key.rsplit("/", 1)[-1])


def is_flagged(key: str, interval: tuple[float, float], overall: float) -> bool:
    """The interval lies wholly on the worse side of the overall estimate (see the module docstring)."""
    low, high = interval
    direction = metric_direction(key)
    if direction is None or any(math.isnan(float(value)) for value in (low, high, overall)):
        return False
    return high < overall if direction == "max" else low > overall


@dataclass
class Subgroup:
    column: str
    value: str
    n_images: int
    n_patients: int
    metrics: dict = field(default_factory=dict)  # empty when too small
    intervals: dict = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)  # every flagged metric key

    @property
    def estimated(self) -> bool:
        return bool(self.metrics)


def patient_count(patient_ids: Sequence | None, rows: np.ndarray) -> int:
    """Distinct patients among `rows`; an image without a patient id (or no ids at all) is a patient of its own."""
    if patient_ids is None:
        return int(rows.size)
    ids = [patient_ids[row] for row in rows.tolist()]
    known = {patient for patient in ids if patient not in (None, "")}
    return len(known) + sum(patient in (None, "") for patient in ids)


def subgroup_results(zone_probs: np.ndarray, zone_targets: np.ndarray, csi_truth: np.ndarray | None,
                     ahf_truth: np.ndarray | None, patient_ids: Sequence | None,
                     metadata: dict[str, list[str | None]], columns: Sequence[str], overall: dict, *,
                     min_images: int = DEFAULT_MIN_IMAGES, min_patients: int = DEFAULT_MIN_PATIENTS,
                     n_resamples: int = 1000, seed: int = 0) -> list[Subgroup]:
    """Every subgroup of each column (values sorted, "(missing)" last), estimated or named as too small.
    `overall` is compute_metrics of the whole split, the estimate a subgroup's interval is compared with."""
    from csi_dist.evaluation.intervals import bootstrap_intervals
    from csi_dist.evaluation.metrics import compute_metrics
    check_columns(columns, list(metadata), "the evaluated shards")
    results = []
    for column in columns:
        values = np.array([MISSING_VALUE if value is None else str(value) for value in metadata[column]], dtype=object)
        names = sorted(set(values.tolist()) - {MISSING_VALUE}) + ([MISSING_VALUE] if MISSING_VALUE in values else [])
        for name in names:
            rows = np.flatnonzero(values == name)
            group = Subgroup(column, name, int(rows.size), patient_count(patient_ids, rows))
            results.append(group)
            if group.n_images < min_images or group.n_patients < min_patients:
                continue
            pick = (None if csi_truth is None else np.asarray(csi_truth)[rows],
                    None if ahf_truth is None else np.asarray(ahf_truth)[rows])
            group.metrics = compute_metrics(zone_probs[rows], zone_targets[rows], *pick)
            groups = None if patient_ids is None else [patient_ids[row] for row in rows.tolist()]
            if n_resamples > 0:  # 0: estimates without intervals, so nothing can be flagged
                group.intervals = bootstrap_intervals(zone_probs[rows], zone_targets[rows], *pick, groups=groups,
                                                      n_resamples=n_resamples, seed=seed)
            group.flags = [key for key, interval in group.intervals.items()
                           if key in overall and is_flagged(key, interval, overall[key])]
    return results


def subgroup_rows(results: list[Subgroup], overall: dict) -> list[dict]:
    """The rows of <split>_subgroups.csv (see the module docstring)."""
    rows = []
    for group in results:
        base = {"column": group.column, "value": group.value, "n_images": group.n_images,
                "n_patients": group.n_patients, "status": ESTIMATED if group.estimated else TOO_SMALL}
        if not group.estimated:
            rows.append(base)
            continue
        for key, estimate in group.metrics.items():
            low, high = group.intervals.get(key, (math.nan, math.nan))
            rows.append({**base, "metric": key, "estimate": estimate, "ci_low": low, "ci_high": high,
                         "overall": overall.get(key, math.nan), "flag": int(key in group.flags)})
    return rows


def _cell(group: Subgroup, key: str) -> str:
    estimate = group.metrics.get(key, math.nan)
    if estimate is None or math.isnan(float(estimate)):
        return "n/a"
    low, high = group.intervals.get(key, (math.nan, math.nan))
    interval = "" if math.isnan(float(low)) else f" [{low:.3f}, {high:.3f}]"
    return f"{estimate:.3f}{interval}"


def subgroups_markdown(results: list[Subgroup], overall: dict, split: str, *, min_images: int, min_patients: int,
                       n_resamples: int, csv_name: str, total_patients: int | str = "") -> str:
    """The report's "## Subgroups" section: per column a table of the key metrics with intervals and the flags."""
    keys = [key for key in REPORT_METRICS if key in overall]
    lines = ["## Subgroups", "",
             (f"Key metrics of each subgroup with their 95 % bootstrap interval (percentile, {n_resamples} resamples, "
              "whole patients resampled where the shards know them)." if n_resamples > 0 else
              "Key metrics of each subgroup, without intervals (--bootstrap-resamples 0): nothing can be flagged.")
             + " **FLAG**: the subgroup's interval lies wholly on "
             "the worse side of the overall estimate of the split: below it for metrics where higher is better "
             "(F1, accuracy, AUROC), above it for error metrics (csi_mae). Flags here are read on the metrics "
             "shown; the CSV flags every metric (among many metrics, some flags arise by chance). A subgroup with "
             f"fewer than {min_images} images or {min_patients} patients is named with its size and not estimated. "
             f"Every metric of every subgroup: [{csv_name}]({csv_name}).", ""]
    for column in dict.fromkeys(group.column for group in results):
        groups = [group for group in results if group.column == column]
        lines += [f"### {column}", "", f"| {column} | images | patients | " + " | ".join(keys) + " | flag |",
                  "|" + "---|" * (len(keys) + 4)]
        lines.append(f"| all of {split} | {overall.get('n_images', '')} | {total_patients} | "
                     + " | ".join("n/a" if math.isnan(float(overall[key])) else f"{overall[key]:.3f}" for key in keys)
                     + " | |")
        for group in groups:
            if not group.estimated:
                lines.append(f"| {group.value} | {group.n_images} | {group.n_patients} | {TOO_SMALL} "
                             f"({group.n_images} images, {group.n_patients} patients)" + " |" * len(keys) + " |")
                continue
            flagged = [key for key in keys if key in group.flags]
            flag = f"**FLAG**: {', '.join(flagged)}" if flagged else ""
            lines.append(f"| {group.value} | {group.n_images} | {group.n_patients} | "
                         + " | ".join(_cell(group, key) for key in keys) + f" | {flag} |")
        lines.append("")
    return "\n".join(lines)


def write_subgroups(out_dir: Path, split: str, predictions, overall: dict, options: SubgroupOptions) -> list[Subgroup]:
    """<split>_subgroups.csv and the report's section (appended to <split>_report.md) of a split's predictions
    (evaluation.inference.SplitPredictions, with metadata and, when known, patient ids)."""
    import pandas as pd

    from csi_dist.core.files import atomic_write
    results = subgroup_results(predictions.zone_probs, predictions.zone_targets, predictions.csi_truth,
                               predictions.ahf_truth, predictions.patient_ids or None, predictions.metadata,
                               options.columns, overall, min_images=options.min_images,
                               min_patients=options.min_patients, n_resamples=options.n_resamples, seed=options.seed)
    csv_path = Path(out_dir) / f"{split}_subgroups.csv"
    table = pd.DataFrame(subgroup_rows(results, overall), columns=list(CSV_COLUMNS))
    atomic_write(csv_path, lambda path: table.to_csv(path, sep=CSV_SEPARATOR, index=False,
                                                      float_format=CSV_FLOAT_FORMAT))
    report = Path(out_dir) / f"{split}_report.md"
    section = subgroups_markdown(results, overall, split, min_images=options.min_images,
                                 min_patients=options.min_patients, n_resamples=options.n_resamples,
                                 csv_name=csv_path.name,
                                 total_patients=patient_count(predictions.patient_ids or None,
                                                              np.arange(len(predictions.zone_targets))))
    report.write_text(report.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + section, encoding="utf-8")
    for group in results:
        if not group.estimated:
            logger.warning("%s: subgroup %s=%s has %d images of %d patients: %s", split, group.column, group.value,
                           group.n_images, group.n_patients, TOO_SMALL)
        elif any(key in group.flags for key in REPORT_METRICS):
            logger.warning("%s: subgroup %s=%s does worse than the whole split (interval wholly on the worse side) "
                           "in %s", split, group.column, group.value,
                           ", ".join(key for key in REPORT_METRICS if key in group.flags))
    return results
