"""The calibration part of a split's evaluation: which probabilities the outputs use (raw or temperature-scaled),
the calibration metrics before and after scaling, the reliability diagrams, and the report's Markdown section.

Files written under out_dir (raw always; calibrated when temperatures are known for the weights):
    <split>_reliability_raw.png, <split>_reliability_raw_zones.png                 all zones pooled; one panel a zone
    <split>_reliability_calibrated.png, <split>_reliability_calibrated_zones.png
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csi_dist.core.domain import ZONE_NAMES
from csi_dist.evaluation.calibration import (CALIBRATED, METRIC_KEYS, N_BINS, RAW, CalibrationError,
                                             calibration_metrics, calibration_path, fit_calibration, read_calibration,
                                             reliability_bins, zone_softmax)
from csi_dist.evaluation.intervals import format_estimate
from csi_dist.core.files import file_sha256

log = logging.getLogger(__name__)

DPI = 120
LABELS = {"ece": "ECE", "classwise_ece": "classwise ECE", "brier": "Brier", "nll": "NLL"}
WHICH = {RAW: "raw probabilities (softmax of the logits)",
         CALIBRATED: "calibrated probabilities (temperature-scaled)"}


@dataclass
class CalibratedSplit:
    zone_probs: np.ndarray  # (N, 6, 5) the probabilities every other output of the split uses
    probabilities: str  # RAW or CALIBRATED
    metrics: dict  # for the metrics JSON: METRIC_KEYS of those used, the other kind's prefixed, the temperatures
    markdown: str  # the report's calibration section (without intervals)
    paths: dict[str, Path]
    section: Callable[[dict], str] | None = None  # the section with these intervals of the probabilities used

    def append_to_report(self, report: Path, intervals: dict[str, tuple[float, float]] | None = None) -> None:
        """Append the calibration section, with each metric's interval (intervals.split_bootstrap) when given."""
        markdown = self.section(intervals) if intervals and self.section is not None else self.markdown
        report.write_text(report.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + markdown, encoding="utf-8")


class EvaluationCalibration:
    """evaluate's calibration over its splits: the temperatures stored for the weights, fitted anew on the val split
    of the shards the model was trained on (unless `use_calibrated`: then they must exist, else CalibrationError
    at construction, before anything is loaded), applied to each split."""

    def __init__(self, weights_file: Path, use_calibrated: bool, shard_dir: str, manifest_sha256: str | None,
                 own_shards: bool):
        self.weights_file, self.use_calibrated = Path(weights_file), use_calibrated
        self.shard_dir, self.manifest_sha256, self.own_shards = str(shard_dir), manifest_sha256, own_shards
        self.fitted_now = False
        try:
            self.record: dict | None = read_calibration(self.weights_file)
        except CalibrationError:
            if use_calibrated:
                raise
            self.record = None

    def order(self, splits: list[str]) -> list[str]:
        """val first when it is fitted on: the other splits' reports then show calibration after scaling too."""
        if "val" not in splits or self.use_calibrated:
            return list(splits)
        if not self.own_shards:
            log.warning("no temperatures are fitted on the val split of shards the model was not trained on (%s)",
                        self.shard_dir)
            return list(splits)
        return ["val", *[split for split in splits if split != "val"]]

    def apply(self, out_dir: Path, split: str, predictions) -> tuple[object, CalibratedSplit]:
        """(the split's inference.SplitPredictions with the probabilities to use, its calibration part), after
        fitting the temperatures on it when it is the val split."""
        if split == "val" and self.own_shards and not self.use_calibrated:
            self.record = fit_calibration(self.weights_file, predictions.zone_logits, predictions.zone_targets, {
                "split": split, "shard_dir": self.shard_dir, "manifest_sha256": self.manifest_sha256,
                "n_images": len(predictions.file_ids)})
            self.fitted_now = True
        fitted_on = (self.record or {}).get("fitted_on", {})
        in_sample = (fitted_on.get("split"), fitted_on.get("manifest_sha256")) == (split, self.manifest_sha256)
        scaled = calibrate_split(out_dir, split, predictions.zone_logits, predictions.zone_targets, self.record,
                                 self.use_calibrated, fitted_here=in_sample,
                                 source=calibration_path(self.weights_file) if self._stored() else None)
        return dataclasses.replace(predictions, zone_probs=scaled.zone_probs), scaled

    def scaled(self, predictions):
        """`predictions` with the probabilities the outputs use (nothing fitted or written): a reference set."""
        if not self.use_calibrated:
            return predictions
        return dataclasses.replace(predictions, zone_probs=zone_softmax(predictions.zone_logits,
                                                                        np.asarray(self.record["temperatures"])))

    def _stored(self) -> bool:
        """The temperatures in use are those of the file beside the weights (not kept in memory only)."""
        return bool(self.record and self.record.get("weights_sha256")) and calibration_path(self.weights_file).is_file()

    def provenance(self) -> dict:
        """For the evaluation's provenance.json: which probabilities, and the temperatures with their file."""
        path = calibration_path(self.weights_file)
        stored = self._stored()
        return {"probabilities": CALIBRATED if self.use_calibrated else RAW,
                "calibration": self.record and {"file": str(path.resolve()) if stored else None,
                                                "sha256": file_sha256(path) if stored else None,
                                                "fitted_now": self.fitted_now, **self.record}}


def calibrate_split(out_dir: Path, split: str, zone_logits: np.ndarray, zone_targets: np.ndarray,
                    calibration: dict | None, use_calibrated: bool, fitted_here: bool = False,
                    source: Path | None = None) -> CalibratedSplit:
    """Probabilities, metrics, figures and report section of one split. `calibration` is the record of
    calibration.read_calibration / fit_calibration (None: no temperatures known for these weights);
    `use_calibrated` (evaluate --calibrated) needs one. `fitted_here`: the temperatures were fitted on this split."""
    if use_calibrated and calibration is None:
        raise ValueError("use_calibrated needs the calibration record")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    probs = {RAW: zone_softmax(zone_logits)}
    if calibration is not None:
        probs[CALIBRATED] = zone_softmax(zone_logits, np.asarray(calibration["temperatures"]))
    used = CALIBRATED if use_calibrated else RAW
    by_kind = {kind: calibration_metrics(kind_probs, zone_targets) for kind, kind_probs in probs.items()}
    metrics: dict = dict(by_kind[used])
    for kind in by_kind.keys() - {used}:
        metrics.update({f"{kind}/{key}": value for key, value in by_kind[kind].items()})
    if calibration is not None:
        metrics.update({f"temperature/{zone}": float(value) for zone, value in
                        zip(ZONE_NAMES, calibration["temperatures"])})
    paths = {}
    for kind, kind_probs in probs.items():
        temperatures = calibration["temperatures"] if kind == CALIBRATED else None
        paths[kind] = out_dir / f"{split}_reliability_{kind}.png"
        paths[f"{kind}_zones"] = out_dir / f"{split}_reliability_{kind}_zones.png"
        _save(pooled_figure(kind_probs, zone_targets, f"{split}: {WHICH[kind]}"), paths[kind])
        _save(zones_figure(kind_probs, zone_targets, f"{split}: {WHICH[kind]}", temperatures),
              paths[f"{kind}_zones"])
    markdown = _section(split, used, by_kind, calibration, fitted_here, source, paths)
    return CalibratedSplit(probs[used], used, metrics, markdown, paths, lambda intervals: _section(
        split, used, by_kind, calibration, fitted_here, source, paths, intervals))


def probabilities_line(probabilities: str) -> str:
    """The report's line saying which probabilities its numbers use."""
    return f"Probabilities used throughout this report: **{WHICH[probabilities]}**."


# ---------------------------------------------------------------------------------------------------- figures


def pooled_figure(zone_probs: np.ndarray, zone_targets: np.ndarray, title: str):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(6.4, 6.0))
    figure.subplots_adjust(left=0.12, bottom=0.1, right=0.97, top=0.88)
    axes = figure.add_subplot()
    ece = _draw(axes, zone_probs.reshape(-1, zone_probs.shape[-1]), np.asarray(zone_targets).ravel(), count_size=8)
    axes.set_title(f"{title}\nall zones pooled: ECE {_number(ece)} ({N_BINS} equal-mass bins, "
                   f"{np.asarray(zone_targets).size} zone predictions)", fontsize=10)
    axes.legend(loc="upper left", fontsize=8)
    return figure


def zones_figure(zone_probs: np.ndarray, zone_targets: np.ndarray, title: str, temperatures=None):
    from matplotlib.figure import Figure
    figure = Figure(figsize=(12.0, 8.2))
    figure.subplots_adjust(left=0.07, bottom=0.07, right=0.97, top=0.88, wspace=0.25, hspace=0.38)
    figure.suptitle(f"{title}\nper zone, {N_BINS} equal-mass bins", fontsize=11)
    targets = np.asarray(zone_targets)
    for zone, name in enumerate(ZONE_NAMES):
        axes = figure.add_subplot(2, 3, zone + 1)
        ece = _draw(axes, zone_probs[:, zone], targets[:, zone], count_size=7)
        temperature = "" if temperatures is None else f", T {float(temperatures[zone]):.2f}"
        axes.set_title(f"{name}: ECE {_number(ece)}{temperature}", fontsize=10)
        if zone == 0:
            axes.legend(loc="upper left", fontsize=7)
        if zone % 3:
            axes.set_ylabel("")
        if zone < 3:
            axes.set_xlabel("")
    return figure


def _draw(axes, probs: np.ndarray, targets: np.ndarray, count_size: int) -> float:
    """Top-label reliability on `axes`: a bar per bin over its confidence range, the accuracy (height) at the mean
    confidence, the count of each bin, the diagonal. Returns the ECE."""
    bins = reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == targets) if len(targets) else None
    axes.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    if bins is not None and bins.count.size:
        axes.bar(bins.lower, bins.accuracy, width=np.maximum(bins.upper - bins.lower, 0.004), align="edge",
                 color="tab:blue", alpha=0.25, edgecolor="tab:blue", label="bin: confidence range, accuracy")
        axes.plot(bins.mean_score, bins.accuracy, "o-", color="tab:blue", markersize=4,
                  label="accuracy at mean confidence")
        # the counts as one line, in bin order: equal-mass bins can be too narrow to label each one
        counts = (f"{int(bins.count[0])} predictions in each bin" if bins.count.min() == bins.count.max()
                  else "predictions per bin: " + " ".join(str(int(count)) for count in bins.count))
        axes.text(0.98, 0.03, counts, ha="right", va="bottom", fontsize=count_size,
                  transform=axes.transAxes)
    else:
        axes.text(0.5, 0.5, "no predictions", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.08)
    axes.set_xlabel("confidence (largest of the 5 class probabilities)")
    axes.set_ylabel("accuracy (fraction whose class is the target)")
    return bins.error if bins is not None else float("nan")


def _save(figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(figure)  # a bare Figure: nothing stays open in pyplot's registry
    figure.savefig(path, dpi=DPI)


# ---------------------------------------------------------------------------------------------------- Markdown


def _number(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.4f}"


def _section(split: str, used: str, by_kind: dict, calibration: dict | None, fitted_here: bool,
             source: Path | None, paths: dict[str, Path], intervals: dict | None = None) -> str:
    lines = ["## Calibration", "", f"Probabilities used by the other sections: {used}.", "",
             f"ECE: top-label (the largest probability against its class being the target), {N_BINS} equal-mass "
             "bins; classwise ECE: mean over the 5 classes of each class's ECE; Brier: multiclass, 0 to 2; NLL: "
             "mean -log p(target). Over every zone target, unknown included (a class the model predicts).", ""]
    if intervals:
        lines += [f"In brackets, for the {used} probabilities: the bootstrap interval, from the same resamples as the "
                  "other intervals of this report. A binned ECE is biased upward, and more so in a resample (copies "
                  "of an image share a bin), so on small splits its interval can lie above the estimate: read it as "
                  "the spread, not as a bound around the estimate.", ""]
    if calibration is None:
        lines += ["No temperatures are known for these weights: evaluate the val split (of the shards the model "
                  "was trained on) to fit them.", ""]
    else:
        fitted_on = calibration.get("fitted_on", {})
        lines += [f"Temperature scaling, one temperature T per zone, fitted on split `{fitted_on.get('split')}` "
                  f"({fitted_on.get('n_images')} images of {fitted_on.get('shard_dir')}) by minimising the NLL"
                  + (f"; stored in `{source}`." if source else "; not stored (its folder could not be written).")
                  + " Scaling never changes a predicted class.", ""]
        if fitted_here:
            lines += [f"The temperatures were fitted on this split (`{split}`): its calibrated numbers are "
                      "in-sample, so optimistic; judge calibration on another split (test).", ""]
    kinds = list(by_kind)
    header = ["zone"] + (["T"] if calibration is not None else [])
    header += [f"{LABELS[key]} {kind}" for key in METRIC_KEYS for kind in kinds]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, zone in enumerate(("all zones", *ZONE_NAMES)):
        prefix = "" if index == 0 else f"{zone}/"
        row = [zone]
        if calibration is not None:
            row.append("" if index == 0 else f"{float(calibration['temperatures'][index - 1]):.3f}")
        row += [format_estimate(by_kind[kind][f"{prefix}{key}"], intervals.get(f"{prefix}{key}"))
                if intervals and kind == used else _number(by_kind[kind][f"{prefix}{key}"])
                for key in METRIC_KEYS for kind in kinds]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for kind in kinds:
        lines += [f"![reliability, {WHICH[kind]}]({paths[kind].name})", "",
                  f"Per zone: [{paths[f'{kind}_zones'].name}]({paths[f'{kind}_zones'].name})", ""]
    return "\n".join(lines)
