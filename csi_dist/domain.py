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
