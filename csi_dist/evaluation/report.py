"""Evaluation report of one split: predictions CSV, metrics JSON, confusion/ROC/PR figures, AHF table and summary.

Files written by write_evaluation under out_dir (returned as {key: path}):
    <split>_predictions.csv       key "predictions": one row per image, separator domain.CSV_SEPARATOR; FileID, per
                                  zone <zone>_true, <zone>_pred and <zone>_p_<class name> for the 5 classes;
                                  csi_avg_true, csi_avg_pred (NaN when no graded zone), csi_expected_pred (the
                                  continuous score of metrics.expected_csi), ahf_class_true/pred (-1 when the
                                  average is undefined), the CSV csi / real ahf / patient_id columns when given,
                                  probabilities: raw | calibrated (temperature-scaled, evaluate --calibrated)
    <split>_metrics.json          key "metrics": compute_metrics (or the dict given) and "probabilities" (raw |
                                  calibrated); NaN written as null; with a
                                  bootstrap, also "intervals" {key: [low, high]} and "bootstrap" (method, level,
                                  resamples, seed, what was resampled, resamples defining each metric)
    <split>_metrics.csv           key "metrics_csv": metric;estimate;ci_low;ci_high (bounds empty for counts or
                                  without a bootstrap)
    <split>_confusion_<zone>.png  keys "confusion_<zone>", one per zone and "pooled": 5x5 counts, rows = true
    <split>_roc.png, <split>_pr.png  keys "roc", "pr": one-vs-rest per grade on graded targets, pooled over
                                  zones, with sklearn's micro-average; a grade with no positive (or no
                                  negative) is left out
    <split>_ahf.csv, <split>_ahf.md  keys "ahf_csv", "ahf_md": 3x3 AHF risk class confusion with per-class
                                  precision/recall, over images whose true and predicted averages are defined
    <split>_report.md             key "report": key metrics, per-zone table, AHF table, curve AUCs, figure links
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve
from sklearn.preprocessing import label_binarize

from csi_dist.core.domain import (AHF_CLASS_NAMES, AHF_COLUMN, AHF_THRESHOLDS, CLASS_NAMES, CSI_COLUMN,
                                  CSV_FLOAT_FORMAT, CSV_SEPARATOR, FILE_ID_COLUMN, GRADES, NUM_CLASSES, PATIENT_COLUMN,
                                  UNKNOWN_CLASS, ZONE_NAMES)
from csi_dist.evaluation.intervals import BootstrapResult, format_estimate, metrics_rows
from csi_dist.core.files import strict_json_value
from csi_dist.evaluation.calibration_report import probabilities_line
from csi_dist.evaluation.metrics import (POOLED, ahf_classes, compute_metrics, confusion_matrices, csi_average,
                                         expected_csi, zone_predictions)

logger = logging.getLogger(__name__)

DPI = 120
KEY_METRICS = ("f1_weighted", "f1_macro", "precision_macro", "recall_macro", "accuracy", "f1_macro_zone_mean",
               "unknown_recall", "unknown_precision", "csi_mae", "csi_rmse", "csi_pearson_r", "csi_n_images",
               "csi_csv_mae", "csi_csv_rmse", "csi_csv_pearson_r", "csi_csv_n_images", "ahf_accuracy",
               "ahf_f1_macro", "ahf_auroc", "ahf_auroc_n_images", "n_images", "n_graded_zones")
ZONE_METRICS = ("support", "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "accuracy")


def write_evaluation(out_dir: Path, split: str, file_ids: list[str], zone_probs: np.ndarray,
                     zone_targets: np.ndarray, csi_truth: np.ndarray | None = None,
                     ahf_truth: np.ndarray | None = None, metrics: dict | None = None,
                     bootstrap: BootstrapResult | None = None,
                     patient_ids: list[str | None] | None = None, probabilities: str = "raw") -> dict[str, Path]:
    """Write the evaluation files of one split (listed in the module docstring) and return their paths by key;
    `bootstrap` (intervals.bootstrap of these predictions) adds every metric's interval; `probabilities` (raw |
    calibrated: which the zone_probs are) is said in the CSV, the JSON and the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    zone_probs = np.asarray(zone_probs, dtype=float)
    zone_targets = np.asarray(zone_targets)
    if len(file_ids) != zone_probs.shape[0]:
        raise ValueError(f"file_ids: expected {zone_probs.shape[0]} ids (one per row of zone_probs), "
                         f"got {len(file_ids)}")
    if metrics is None:
        metrics = compute_metrics(zone_probs, zone_targets, csi_truth, ahf_truth)
    paths: dict[str, Path] = {}

    predictions = zone_predictions(zone_probs)
    true_average, pred_average = csi_average(zone_targets), csi_average(predictions)
    paths["predictions"] = out_dir / f"{split}_predictions.csv"
    table = _predictions_table(file_ids, zone_probs, zone_targets, predictions, true_average, pred_average,
                               csi_truth, ahf_truth)
    if patient_ids is not None and any(patient is not None for patient in patient_ids):
        table[PATIENT_COLUMN] = patient_ids  # compare resamples the same patients
    table["probabilities"] = probabilities
    table.to_csv(paths["predictions"], sep=CSV_SEPARATOR, index=False,
                                         float_format=CSV_FLOAT_FORMAT)

    paths["metrics"] = out_dir / f"{split}_metrics.json"
    # NaN becomes null: bare NaN is not JSON and breaks strict readers (jq, browsers); counts stay integers
    document = dict(metrics, probabilities=probabilities)
    if bootstrap is not None:
        summary = bootstrap.summary()
        document.update(intervals=summary.pop("intervals"), bootstrap=summary)
    paths["metrics"].write_text(json.dumps(strict_json_value(document), indent=2, allow_nan=False) + "\n")
    paths["metrics_csv"] = out_dir / f"{split}_metrics.csv"
    pd.DataFrame(metrics_rows(metrics, bootstrap and bootstrap.intervals),
                 columns=["metric", "estimate", "ci_low", "ci_high"]).to_csv(
        paths["metrics_csv"], sep=CSV_SEPARATOR, index=False, float_format=CSV_FLOAT_FORMAT)

    for name, matrix in confusion_matrices(zone_probs, zone_targets).items():
        paths[f"confusion_{name}"] = out_dir / f"{split}_confusion_{name}.png"
        title = f"{split}: {'all zones' if name == POOLED else name}"
        counted = "zone readings (6 per image)" if name == POOLED else "images"
        _save(_confusion_figure(matrix, CLASS_NAMES, title, counted), paths[f"confusion_{name}"])

    graded = zone_targets.ravel() != UNKNOWN_CLASS
    graded_targets = zone_targets.ravel()[graded]
    graded_scores = zone_probs.reshape(-1, NUM_CLASSES)[graded][:, list(GRADES)]
    paths["roc"], paths["pr"] = out_dir / f"{split}_roc.png", out_dir / f"{split}_pr.png"
    roc_figure, pr_figure, curve_rows = _curve_figures(graded_targets, graded_scores, split)
    _save(roc_figure, paths["roc"])
    _save(pr_figure, paths["pr"])

    ahf_table = _ahf_table(ahf_classes(true_average), ahf_classes(pred_average))
    paths["ahf_csv"], paths["ahf_md"] = out_dir / f"{split}_ahf.csv", out_dir / f"{split}_ahf.md"
    ahf_table.to_csv(paths["ahf_csv"], sep=CSV_SEPARATOR, index=False, float_format=CSV_FLOAT_FORMAT)
    ahf_markdown = _ahf_markdown(ahf_table)
    paths["ahf_md"].write_text(ahf_markdown)

    paths["report"] = out_dir / f"{split}_report.md"
    paths["report"].write_text(_report_markdown(split, metrics, ahf_markdown, curve_rows, paths, bootstrap,
                                                probabilities))
    logger.info("wrote %d evaluation files of split %s to %s", len(paths), split, out_dir)
    return paths


def _predictions_table(file_ids, zone_probs, zone_targets, predictions, true_average, pred_average, csi_truth,
                       ahf_truth) -> pd.DataFrame:
    columns: dict[str, object] = {FILE_ID_COLUMN: [str(file_id) for file_id in file_ids]}
    for zone, name in enumerate(ZONE_NAMES):
        columns[f"{name}_true"] = zone_targets[:, zone]
        columns[f"{name}_pred"] = predictions[:, zone]
        for klass, class_name in enumerate(CLASS_NAMES):
            columns[f"{name}_p_{class_name}"] = zone_probs[:, zone, klass]
    columns["csi_avg_true"] = true_average
    columns["csi_avg_pred"] = pred_average
    columns["csi_expected_pred"] = expected_csi(zone_probs)
    columns["ahf_class_true"] = ahf_classes(true_average)
    columns["ahf_class_pred"] = ahf_classes(pred_average)
    if csi_truth is not None:
        columns[CSI_COLUMN] = np.asarray(csi_truth, dtype=float).reshape(-1)
    if ahf_truth is not None:
        columns[AHF_COLUMN] = np.asarray(ahf_truth, dtype=float).reshape(-1)
    return pd.DataFrame(columns)


def _save(figure: Figure, path: Path) -> None:
    # a bare Figure on an Agg canvas never enters pyplot's registry, so nothing stays open after saving
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)


def _confusion_figure(matrix: np.ndarray, class_names: tuple[str, ...], title: str, counted: str) -> Figure:
    """The counts of a 5x5 confusion matrix, colour bar in whole numbers of `counted` (images, zone readings)."""
    from matplotlib.ticker import MaxNLocator
    figure = Figure(figsize=(5.6, 4.8))
    # fixed margins instead of a layout engine: layout solving doubled the time of every figure
    figure.subplots_adjust(left=0.2, bottom=0.2, right=0.98, top=0.92)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    colour_bar = figure.colorbar(image, ax=axes, label=f"number of {counted}")
    colour_bar.locator = MaxNLocator(integer=True)  # counts: no tick at 2.5 images
    colour_bar.update_ticks()
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=30, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    threshold = matrix.max() / 2
    for row in ticks:
        for col in ticks:
            axes.text(col, row, str(int(matrix[row, col])), ha="center", va="center",
                      color="white" if matrix[row, col] > threshold else "black")
    return figure


def _curve_figures(targets: np.ndarray, scores: np.ndarray, split: str) -> tuple[Figure, Figure, list[tuple]]:
    """ROC and PR figures one-vs-rest per grade, plus the micro-average; rows (name, positives, auroc, ap)."""
    roc_figure, pr_figure = Figure(figsize=(6.4, 5.2)), Figure(figsize=(6.4, 5.2))
    for figure in (roc_figure, pr_figure):
        figure.subplots_adjust(left=0.12, bottom=0.11, right=0.97, top=0.92)
    roc_axes, pr_axes = roc_figure.add_subplot(), pr_figure.add_subplot()
    rows = []
    if targets.size:
        one_hot = label_binarize(targets, classes=list(GRADES))
        curves = [(CLASS_NAMES[grade], one_hot[:, column], scores[:, column], "-")
                  for column, grade in enumerate(GRADES)]
        curves.append(("micro-average", one_hot.ravel(), scores.ravel(), "--"))
        for name, is_positive, score, style in curves:
            positives = int(is_positive.sum())
            if positives == 0 or positives == is_positive.size:
                logger.info("split %s: no %s for %s, left out of the ROC/PR curves", split,
                            "positive" if positives == 0 else "negative", name)
                continue
            fpr, tpr, _ = roc_curve(is_positive, score)
            precision, recall, _ = precision_recall_curve(is_positive, score)
            roc_auc, ap = float(auc(fpr, tpr)), float(average_precision_score(is_positive, score))
            roc_axes.plot(fpr, tpr, style, label=f"{name} (AUC {roc_auc:.3f}, n+={positives})")
            pr_axes.plot(recall, precision, style, label=f"{name} (AP {ap:.3f}, n+={positives})")
            rows.append((name, positives, roc_auc, ap))
    roc_axes.plot([0, 1], [0, 1], ":", color="grey")
    for axes, kind, xlabel, ylabel in ((roc_axes, "ROC", "false positive rate", "true positive rate"),
                                       (pr_axes, "precision-recall", "recall", "precision")):
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(f"{split}: {kind} per grade, graded zones pooled")
        if rows:
            axes.legend(loc="lower right" if kind == "ROC" else "lower left", fontsize="small")
        else:
            axes.text(0.5, 0.5, "no grade with both positives and negatives", ha="center", va="center")
    return roc_figure, pr_figure, rows


def _ahf_table(true_class: np.ndarray, pred_class: np.ndarray) -> pd.DataFrame:
    """One row per true AHF class: counts per predicted class, support, precision and recall (NaN if undefined)."""
    defined = (true_class >= 0) & (pred_class >= 0)
    n_classes = len(AHF_CLASS_NAMES)
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (true_class[defined], pred_class[defined]), 1)
    support, predicted, hits = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, hits / predicted, np.nan)
        recall = np.where(support > 0, hits / support, np.nan)
    table = pd.DataFrame(matrix, columns=[f"pred_{name}" for name in AHF_CLASS_NAMES])
    table.insert(0, "true_class", AHF_CLASS_NAMES)
    table["support"], table["precision"], table["recall"] = support, precision, recall
    return table


def _ahf_markdown(table: pd.DataFrame) -> str:
    predicted_columns = [f"pred_{name}" for name in AHF_CLASS_NAMES]
    header = "| true \\ predicted | " + " | ".join(AHF_CLASS_NAMES) + " | support | precision | recall |"
    lines = [header, "|" + "---|" * (len(AHF_CLASS_NAMES) + 4)]
    for _, row in table.iterrows():
        counts = " | ".join(str(int(row[column])) for column in predicted_columns)
        lines.append(f"| {row['true_class']} | {counts} | {int(row['support'])} | {_format(row['precision'])} | "
                     f"{_format(row['recall'])} |")
    return "\n".join(lines) + "\n"


def _format(value, is_count: bool = False) -> str:
    if value is None or math.isnan(float(value)):
        return "n/a"
    return str(int(value)) if is_count else f"{float(value):.4f}"


def _is_count(key: str) -> bool:
    return key.startswith("n_") or key.endswith(("n_images", "support"))


def _report_markdown(split: str, metrics: dict, ahf_markdown: str, curve_rows: list[tuple],
                     paths: dict[str, Path], bootstrap: BootstrapResult | None = None,
                     probabilities: str = "raw") -> str:
    intervals = bootstrap.intervals if bootstrap is not None else {}
    lines = [f"# Evaluation of split `{split}`", "", probabilities_line(probabilities), "",
             "Grade metrics use graded zones only (a predicted unknown on a graded zone is an error); CSI and AHF "
             "use images whose true and predicted CSI averages are both defined. n/a = undefined on this data.", ""]
    lines += [bootstrap.description(), ""] if bootstrap is not None else []
    lines += ["## Key metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {format_estimate(metrics[key], intervals.get(key), _is_count(key))} |"
              for key in KEY_METRICS if key in metrics]
    lines += ["", "## Per zone (graded targets)", "", "| zone | " + " | ".join(ZONE_METRICS) + " |",
              "|" + "---|" * (len(ZONE_METRICS) + 1)]
    for zone in ZONE_NAMES:
        values = " | ".join(format_estimate(metrics.get(f"{zone}/{key}"), intervals.get(f"{zone}/{key}"),
                                            _is_count(key)) for key in ZONE_METRICS)
        lines.append(f"| {zone} | {values} |")
    low, medium = AHF_THRESHOLDS
    lines += ["", f"## AHF risk class (from the CSI average: low <= {low} < medium <= {medium} < high)", "",
              ahf_markdown,
              "## One-vs-rest curves per grade (graded zones pooled)", "",
              "| grade | positives | AUROC | average precision |", "|---|---|---|---|"]
    lines += [f"| {name} | {positives} | {roc_auc:.4f} | {ap:.4f} |" for name, positives, roc_auc, ap in curve_rows]
    if not curve_rows:
        lines.append("| none: no grade has both positives and negatives | | | |")
    lines += ["", "## Figures", "", f"- [ROC]({paths['roc'].name})", f"- [precision-recall]({paths['pr'].name})"]
    lines += [f"- [confusion {name}]({paths[f'confusion_{name}'].name})" for name in (*ZONE_NAMES, POOLED)]
    lines += ["", f"Predictions: [{paths['predictions'].name}]({paths['predictions'].name}); "
              f"metrics: [{paths['metrics'].name}]({paths['metrics'].name})", ""]
    return "\n".join(lines)
