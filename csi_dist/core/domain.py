"""Domain constants of the Congestion Score Index: the one place that defines zones, classes and label coding."""
from __future__ import annotations

import math

ZONE_NAMES: tuple[str, ...] = ("right_sup", "left_sup", "right_mid", "left_mid", "right_inf", "left_inf")
NUM_ZONES = len(ZONE_NAMES)
GRADES: tuple[int, ...] = (0, 1, 2, 3)
UNKNOWN_CLASS = 4
NUM_CLASSES = 5
CLASS_NAMES: tuple[str, ...] = ("normal", "mild", "moderate", "severe", "unknown")

# AHF risk class from the per-image CSI average: inclusive upper bounds of class 0 and 1.
AHF_THRESHOLDS: tuple[float, float] = (1.3, 2.2)
AHF_CLASS_NAMES: tuple[str, ...] = ("low", "medium", "high")

CSV_SEPARATOR = ";"
# numbers in the CSVs we write: six significant digits (a float64's 17 say nothing to a reader; probabilities come
# from float32 or bf16 models, whose own precision is 7 or 3 digits)
CSV_FLOAT_FORMAT = "%.6g"
FILE_ID_COLUMN = "FileID"
CSI_COLUMN = "csi"
PATIENT_COLUMN = "patient_id"
AHF_COLUMN = "ahf"


def ahf_class(csi_average: float) -> int:
    """AHF risk class (0 low, 1 medium, 2 high) of one CSI average; -1 when the average is undefined (NaN)."""
    if csi_average is None or math.isnan(csi_average):
        return -1
    if csi_average <= AHF_THRESHOLDS[0]:
        return 0
    if csi_average <= AHF_THRESHOLDS[1]:
        return 1
    return 2


# Which way each validation metric a run can monitor (callbacks.monitor) or a sweep can optimise improves: the one
# table that early stopping, ReduceLROnPlateau, best weights and a sweep's "auto" direction all read.
# "loss" is the weighted validation loss; the rest are csi_dist.evaluation.metrics.compute_metrics keys.
METRIC_DIRECTIONS: dict[str, str] = {
    "loss": "min",
    **{name: "max" for name in ("f1_macro", "f1_weighted", "precision_macro", "recall_macro", "accuracy",
                                "f1_macro_zone_mean", "unknown_recall", "unknown_precision", "ahf_accuracy",
                                "ahf_f1_macro", "ahf_auroc", "csi_pearson_r", "csi_csv_pearson_r")},
    **{name: "min" for name in ("csi_mae", "csi_rmse", "csi_csv_mae", "csi_csv_rmse")},
}


def monitored_metric(monitor: str) -> str:
    """The metric key of a monitor name, which may carry the history's "val_" prefix (val_loss, val_f1_weighted);
    a name that is no metric raises ValueError listing the valid ones."""
    key = monitor.removeprefix("val_")
    if key not in METRIC_DIRECTIONS:
        raise ValueError(f"{monitor!r} is not a validation metric; use one of val_loss, "
                         f"{', '.join(name for name in METRIC_DIRECTIONS if name != 'loss')} (val_ prefix optional)")
    return key


def metric_direction(monitor: str) -> str:
    """"min" or "max": whether a smaller or a larger value of the monitored metric is better."""
    return METRIC_DIRECTIONS[monitored_metric(monitor)]
