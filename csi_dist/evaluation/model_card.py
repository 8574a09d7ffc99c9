"""The model card of an evaluated run (`<evaluation dir>/model_card.md`), written by `evaluate` from what the run knows.

Everything is read from files, so the card says only what was recorded: the run's provenance (code commit, packages,
data manifest, config hash, training segments), its resolved config, the shards' manifest and split file, the
evaluation's provenance and per-split metrics with their bootstrap intervals, and, where those steps ran, the
calibration, the subgroup tables and the dataset-shift summary. What only the author knows (intended use, the data's
source and reference standard, limitations, ethics) is left under its heading for the author to fill in.

Headings follow the model-card layout (Mitchell et al., 2019); each names the sections of the imaging-AI reporting
checklists it serves (CLAIM 2024, TRIPOD+AI 2024), so a reviewer finds them where the checklists look.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

from csi_dist.core.config import ConfigError, load_config
from csi_dist.core.domain import CLASS_NAMES, CSV_SEPARATOR, ZONE_NAMES
from csi_dist.evaluation.intervals import format_estimate
from csi_dist.core.run_dir import PROVENANCE, RunDir, calibration_beside, evaluation_provenance, external_evaluations

log = logging.getLogger(__name__)

MODEL_CARD_NAME = "model_card.md"
TO_FILL = "_To be completed by the author._"
HEADLINE_METRICS = ("f1_weighted", "f1_macro", "accuracy", "csi_mae", "csi_rmse", "csi_pearson_r", "ahf_accuracy",
                    "ahf_f1_macro", "ahf_auroc")
CALIBRATION_WORDS = ("ece", "brier", "nll")
# below this many images an evaluation split says little: its intervals are wide (the card says so)
SMALL_SPLIT_IMAGES = 100


def write_model_card(out_dir: Path, run_dir: Path) -> Path:
    """Write `<out_dir>/model_card.md` for the run in `run_dir` evaluated into `out_dir`; returns its path."""
    out_dir, run_dir = Path(out_dir), Path(run_dir)
    provenance = _json(RunDir(run_dir).provenance)
    evaluated = _json(evaluation_provenance(out_dir)).get("evaluated", {})
    origin = provenance.get("origin", {})
    splits = [split for split in evaluated.get("splits", []) if (out_dir / f"{split}_metrics.json").is_file()]
    metrics = {split: _json(out_dir / f"{split}_metrics.json") for split in splits}
    external = bool(origin.get("data", {}).get("manifest_sha256")) and \
        evaluated.get("manifest_sha256") != origin["data"]["manifest_sha256"]
    sections = [
        _title(run_dir, evaluated),
        _model_details(run_dir, provenance, evaluated),
        _placeholder("Intended use", "CLAIM: Introduction; TRIPOD+AI: Background and objectives", [
            "Primary intended use and users (e.g. research on congestion scoring; not for diagnosis on its own)",
            "Clinical setting and patient population it is meant for",
            "Out-of-scope uses"]),
        _data(origin, evaluated, external),
        _performance(out_dir, splits, metrics, external),
        _calibration(run_dir, evaluated, metrics),
        _subgroups(out_dir, splits),
        _dataset_shift(out_dir, splits),
        _external(out_dir),
        _limitations(provenance, metrics),
        _placeholder("Ethical considerations",
                     "CLAIM: Other information; TRIPOD+AI: Ethical approval, Funding, Conflicts of interest", [
            "Approval of the data's use (ethics board, consent or waiver)", "Funding and conflicts of interest",
            "Risks if the model is wrong, and who checks its output"]),
    ]
    lines = [line for section in sections for line in section]
    headings = iter(range(1, len(lines) + 1))  # numbered in order: a section with nothing to show is left out
    lines = [f"## {next(headings)}. {line[3:]}" if line.startswith("## ") else line for line in lines]
    path = out_dir / MODEL_CARD_NAME
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log.info("model card: %s (its 'to be completed' sections are the author's)", path)
    return path


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _title(run_dir: Path, evaluated: dict) -> list[str]:
    return [f"# Model card: CSI model `{run_dir.name}`", "",
            f"Written by `csi_dist.evaluate` at {evaluated.get('utc', 'an unrecorded time')} from the run directory "
            f"`{run_dir}`. Numbers and facts below are read from the run's own records; what only the author knows is "
            f"marked {TO_FILL}", ""]


def _placeholder(heading: str, checklist: str, prompts: Iterable[str]) -> list[str]:
    return [f"## {heading}", "", f"({checklist})", "", TO_FILL, "", *[f"- {prompt}:" for prompt in prompts], ""]


def _model_details(run_dir: Path, provenance: dict, evaluated: dict) -> list[str]:
    origin, segments = provenance.get("origin", {}), provenance.get("segments", [])
    lines = ["## Model details", "", "(CLAIM: Methods, Model and Training; TRIPOD+AI: Methods, Analytical methods)", ""]
    try:
        config = load_config(RunDir(run_dir).resolved_config)
    except ConfigError as error:
        lines += [f"- Config: could not be read ({error})"]
    else:
        size = f"{config.data.image_size} px" if config.data.image_size else "the backbone's native size"
        lines += [f"- Architecture: {config.model.model_arch}, one grayscale input at {size}, normalisation "
                  f"`{config.data.normalization}`; output 6 lung zones "
                  f"({', '.join(ZONE_NAMES)}) x 5 classes ({', '.join(CLASS_NAMES)})",
                  f"- Training: {config.optimization.optimizer}, learning rate {config.optimization.learning_rate}, "
                  f"schedule {config.optimization.scheduler}, batch {config.training.batch_size} per process, "
                  f"up to {config.training.n_epochs} epochs, loss weight of the unknown class "
                  f"{config.loss.unknown_weight}, seed {config.training.seed}",
                  f"- Monitored for the best weights: {config.callbacks.monitor}"]
    code = origin.get("code", {})
    dirty = {True: " (with uncommitted changes)", False: ""}.get(code.get("dirty"), " (changes unknown)")
    lines.append(f"- Code: csi_dist commit `{code.get('commit') or 'unknown (not a git checkout)'}`{dirty}")
    packages = origin.get("environment", {}).get("packages", {})
    if packages:
        lines.append("- Packages: " + ", ".join(f"{name} {version}" for name, version in packages.items() if version))
    lines.append(f"- Config sha256: `{origin.get('config_sha256', 'unknown')}`")
    if segments:
        last = segments[-1]
        strategy = last.get("strategy") or {}
        lines.append(f"- Trained in {len(segments)} segment(s) to step {last.get('end_step')}, last on "
                     f"{last.get('world_size')} process(es) with {strategy.get('name', 'an unrecorded strategy')}; "
                     f"outcome: {last.get('outcome', 'unrecorded')}")
    if evaluated.get("weights"):
        lines.append(f"- Weights evaluated: `{evaluated['weights']}` (sha256 `{evaluated.get('weights_sha256')}`)")
    return [*lines, ""]


def _data(origin: dict, evaluated: dict, external: bool) -> list[str]:
    data = origin.get("data", {})
    lines = ["## Data", "", "(CLAIM: Methods, Data and Ground truth; TRIPOD+AI: Methods, Data and Outcome)", "",
             f"- Training shards: `{data.get('shard_dir', 'unknown')}` (manifest sha256 "
             f"`{data.get('manifest_sha256', 'unknown')}`, split file sha256 `{data.get('split_file_sha256')}`)"]
    if external:
        lines.append(f"- **Evaluated on other data**: `{evaluated.get('shard_dir')}` (manifest sha256 "
                     f"`{evaluated.get('manifest_sha256')}`): an external validation (see Performance and the "
                     f"dataset shift)")
    manifest = _json(Path(data.get("shard_dir", "")) / "manifest.json") if data.get("shard_dir") else {}
    if not manifest:
        lines += ["- The training shards' manifest could not be read here: split sizes and grade counts not shown", ""]
    else:
        patients = _patients_per_split(Path(data["shard_dir"]) / "split.csv")
        lines += ["", "| split | images | patients | " + " | ".join(f"zones graded {name}" for name in CLASS_NAMES)
                  + " |", "|" + "---|" * (3 + len(CLASS_NAMES))]
        for split, entry in manifest.get("splits", {}).items():
            histogram = entry.get("label_histogram", {})
            per_class = [sum(histogram.get(zone, [0] * len(CLASS_NAMES))[klass] for zone in ZONE_NAMES)
                         for klass in range(len(CLASS_NAMES))]
            lines.append(f"| {split} | {entry.get('count', 'n/a')} | {patients.get(split, 'n/a')} | "
                         + " | ".join(str(count) for count in per_class) + " |")
        columns = manifest.get("metadata_columns") or []
        lines += ["", f"- Split: by patient, fractions {manifest.get('split_fractions')}, seed "
                  f"{manifest.get('split_seed')}" + (f" (from the split file {manifest['split_file']})"
                                                     if manifest.get("split_file") else ""),
                  f"- Image metadata carried with the labels: {', '.join(map(str, columns)) if columns else 'none'}",
                  f"- Images left out when the shards were written: {manifest.get('skipped', {}).get('count', 0)}"]
    lines += ["", TO_FILL, "", "- Data source, dates and sites:", "- Eligibility criteria:",
              "- Reference standard (who graded the zones, how, inter-reader agreement):", ""]
    return lines


def _patients_per_split(split_csv: Path) -> dict[str, int]:
    try:
        with split_csv.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter=CSV_SEPARATOR))
    except OSError:
        return {}
    patients: dict[str, set] = {}
    for row in rows:
        patients.setdefault(row.get("split", ""), set()).add(row.get("patient_id") or f"file:{row.get('FileID')}")
    return {split: len(ids) for split, ids in patients.items()}


def _performance(out_dir: Path, splits: list[str], metrics: dict[str, dict], external: bool) -> list[str]:
    lines = ["## Performance" + (" on the external data" if external else ""), "",
             "(CLAIM: Results, Model performance; TRIPOD+AI: Results, Model performance)", ""]
    if not splits:
        return [*lines, "No split was evaluated.", ""]
    bootstrap = next((metrics[split].get("bootstrap") for split in splits if metrics[split].get("bootstrap")), None)
    if bootstrap:
        lines += [f"In brackets: {round(100 * bootstrap.get('level', 0.95))} % {bootstrap.get('method')} bootstrap "
                  f"interval over {bootstrap.get('n_resamples')} resamples of {bootstrap.get('resampled')}, seed "
                  f"{bootstrap.get('seed')}.", ""]
    else:
        lines += ["No intervals were computed (evaluate --bootstrap-resamples 0): point estimates only.", ""]
    lines += ["| metric | " + " | ".join(f"{split} ({metrics[split].get('n_images')} images)" for split in splits)
              + " |", "|" + "---|" * (len(splits) + 1)]
    for key in HEADLINE_METRICS:
        if any(key in metrics[split] for split in splits):
            lines.append(f"| {key} | " + " | ".join(_estimate(metrics[split], key) for split in splits) + " |")
    lines += ["", "Every metric, per zone, with its figures: " + ", ".join(
        f"[{split}]({split}_report.md)" for split in splits if (out_dir / f"{split}_report.md").is_file()), ""]
    return lines


def _estimate(metrics: dict, key: str) -> str:
    interval = (metrics.get("intervals") or {}).get(key)
    value = metrics.get(key)
    return format_estimate(math.nan if value is None else value,
                           None if interval is None else tuple(math.nan if bound is None else bound
                                                               for bound in interval))


def _calibration(run_dir: Path, evaluated: dict, metrics: dict[str, dict]) -> list[str]:
    lines = ["## Calibration", "", "(CLAIM: Methods, Evaluation; TRIPOD+AI: Results, Model performance)", ""]
    weights = Path(evaluated.get("weights", ""))
    calibration = _json(calibration_beside(weights)) if evaluated.get("weights") else {}
    found = False
    if calibration.get("temperatures"):
        found = True
        lines.append("- Temperature scaling per zone (fitted on " + str(calibration.get("fitted_on", {}).get(
            "split", "an unrecorded split")) + "): " + ", ".join(
            f"{zone} {temperature:.3g}" for zone, temperature in zip(ZONE_NAMES, calibration["temperatures"])))
    for split, values in metrics.items():
        keys = [key for key in values if "/" not in key and any(word in key for word in CALIBRATION_WORDS)
                and isinstance(values[key], (int, float))]
        if keys:
            found = True
            used = values.get("probabilities", "raw")
            other = "calibrated" if used == "raw" else "raw"
            compared = [key for key in keys if isinstance(values.get(f"{other}/{key}"), (int, float))]
            lines.append(f"- {split}, {used} probabilities: " + ", ".join(f"{key} {_estimate(values, key)}"
                                                                          for key in keys)
                         + (f"; {other}: " + ", ".join(f"{key} {values[f'{other}/{key}']:.3f}" for key in compared)
                            if compared else ""))
    if found and any("ece" in key for values in metrics.values() for key in values):
        lines.append("- A binned ECE is biased upward in bootstrap resamples: on small splits its interval can lie "
                     "above the estimate.")
    return [*lines, *([] if found else ["Not assessed in this evaluation."]), ""]


def _subgroups(out_dir: Path, splits: list[str]) -> list[str]:
    """Per split: the subgroups flagged on a key metric (interval wholly on the worse side of the split's estimate)
    and those too small to estimate, read from <split>_subgroups.csv."""
    from csi_dist.evaluation.subgroups import REPORT_METRICS, TOO_SMALL
    tables = [(split, out_dir / f"{split}_subgroups.csv") for split in splits]
    tables = [(split, path) for split, path in tables if path.is_file()]
    lines = ["## Subgroups", "", "(CLAIM: Results, Model performance; TRIPOD+AI: Methods and Results, Fairness)", ""]
    if not tables:
        return [*lines, "Not evaluated by subgroup (evaluate --by COLUMN).", ""]
    for split, path in tables:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter=CSV_SEPARATOR))
        flagged = sorted({f"{row['column']} = {row['value']} on {row['metric']}" for row in rows
                          if row.get("flag") == "1" and row.get("metric") in REPORT_METRICS})
        small = sorted({f"{row['column']} = {row['value']} ({row['n_images']} images)" for row in rows
                        if row.get("status") == TOO_SMALL})
        lines += [f"- {split} ([{path.name}]({path.name}), section of [{split}_report.md]({split}_report.md)): "
                  + (f"**flagged** (interval wholly worse than the whole split's estimate): {'; '.join(flagged)}"
                     if flagged else "no subgroup flagged on the key metrics")
                  + (f"; too small to estimate: {'; '.join(small)}" if small else "")]
    return [*lines, ""]


def _dataset_shift(out_dir: Path, splits: list[str]) -> list[str]:
    summaries = [out_dir / f"{split}_dataset_shift.md" for split in splits]
    summaries = [path for path in summaries if path.is_file()]
    if not summaries:
        return []
    return ["## External validation: dataset shift", "", "(CLAIM: Methods, Evaluation; TRIPOD+AI: Methods, Data)", "",
            *[f"- [{path.name}]({path.name}): {_shift_warning(path.with_suffix('.json'))}" for path in summaries],
            ""]


def _shift_warning(summary: Path) -> str:
    warning = _json(summary).get("warning")
    return f"**WARNING**: {warning}" if warning else "no strong difference from the training data"


def _external(out_dir: Path) -> list[str]:
    """The external validations evaluate wrote beside this evaluation (<out>/external/<shards>/): per set and
    split, the headline metrics with their intervals and the dataset-shift verdict."""
    found = sorted(path.parent for path in external_evaluations(out_dir).glob(f"*/{PROVENANCE}"))
    if not found:
        return []
    lines = ["## External validation", "", "(CLAIM: Methods and Results, Evaluation; TRIPOD+AI: Results, Model "
             "performance)", ""]
    for directory in found:
        evaluated = _json(evaluation_provenance(directory)).get("evaluated", {})
        lines.append(f"### `{evaluated.get('shard_dir', directory.name)}`")
        lines.append("")
        for split in evaluated.get("splits", []):
            metrics = _json(directory / f"{split}_metrics.json")
            shown = ", ".join(f"{key} {_estimate(metrics, key)}" for key in HEADLINE_METRICS if key in metrics)
            shift = directory / f"{split}_dataset_shift.json"
            lines.append(f"- {split} ({metrics.get('n_images')} images): {shown}; "
                         f"[report](external/{directory.name}/{split}_report.md)"
                         + (f"; {_shift_warning(shift)}" if shift.is_file() else ""))
        lines.append("")
    return lines


def _limitations(provenance: dict, metrics: dict[str, dict]) -> list[str]:
    """What the records themselves show a reader should weigh, then the author's own."""
    known = []
    segments = provenance.get("segments", [])
    if provenance.get("origin", {}).get("code", {}).get("dirty"):
        known.append("the code had uncommitted changes when training started: the commit alone does not rebuild it")
    if segments and "WITHOUT VALIDATION" in str(segments[-1].get("outcome", "")):
        known.append("trained without a validation split: no early stopping and no best-epoch choice")
    for split, values in metrics.items():
        if (values.get("n_images") or 0) < SMALL_SPLIT_IMAGES:
            known.append(f"split {split} has {values.get('n_images')} images: its intervals are wide")
        if values.get("decode_failures"):
            known.append(f"split {split}: {values['decode_failures']} image(s) could not be decoded and are not "
                         f"counted")
        undefined = [key for key in HEADLINE_METRICS if key in values and values[key] is None]
        if undefined:
            known.append(f"split {split}: undefined on this data: {', '.join(undefined)}")
    lines = ["## Limitations", "", "(CLAIM: Discussion; TRIPOD+AI: Discussion, Limitations)", ""]
    lines += [f"- From the records: {item}" for item in known] or ["- From the records: none noted."]
    return [*lines, "", TO_FILL, "", "- Known failure modes and populations it was not tested on:", ""]
