"""Dataset shift of an external evaluation: how far the evaluated data lie from the data the model was trained on.

When `evaluate` runs a trained model on shards other than its training shards (`--shard-dir`), it writes beside
each split's metrics `<split>_dataset_shift.md` and `<split>_dataset_shift.json`, comparing the evaluated split with
the training shards (the run's resolved config, data.shard_dir):
    labels        zone grades pooled over the six zones (evaluated split vs the training split's manifest
                  histogram, all images) and the CSI average per image (vs a sample of the training split's labels)
    images        pixel value statistics (mean, std, percentiles, 0-255) and, per image, the mean (brightness) and
                  standard deviation (contrast), from an evenly spaced sample of up to SAMPLE_IMAGES images of each
    predictions   the model's predicted grades and expected CSI on the evaluated split vs on the training shards'
                  val split (predicted in the same evaluate run)

Measure of a strong difference: for a continuous quantity the two-sample Kolmogorov-Smirnov statistic D (the
largest gap between the two cumulative distributions), for grades the total variation distance (half the summed
absolute difference of the grade shares); both read as "the largest difference in the share of images (zones)
falling in some range of values (set of grades)", so one threshold means the same for every quantity, and neither
depends on a choice of bins (the population stability index does, and is biased upwards on small samples). A
difference is STRONG when it is at least DIFFERENCE_THRESHOLD (20 percentage points) AND its test (scipy's
ks_2samp, chi-square of the grade counts) gives p < P_THRESHOLD: the size keeps a large set from warning on a
trivial but significant difference, the p-value keeps a small set from warning on noise (with 22 against 114
images a D of 0.4 arises by chance about once in a hundred), and at 0.001 per quantity the chance of any false
warning among the six quantities stays under 1 %.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csi_dist.core.domain import CLASS_NAMES, NUM_CLASSES, ZONE_NAMES
from csi_dist.core.run_dir import RunDir

logger = logging.getLogger(__name__)

TRAINING_SPLIT = "train"  # the labels and images the model learnt from
REFERENCE_SPLIT = "val"  # the training shards' split the model's predictions are compared with
SAMPLE_IMAGES = 500
DIFFERENCE_THRESHOLD = 0.2
P_THRESHOLD = 0.001
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def training_shard_dir(run_dir: Path, evaluated_dir: str | Path) -> Path | None:
    """The run's training shards when `evaluated_dir` holds other ones (another manifest); None when they are the
    same, or when the training shards cannot be found (then logged: no shift summary)."""
    from csi_dist.core.config import ConfigError, load_config
    from csi_dist.data.shards.format import MANIFEST_NAME
    try:
        training = Path(load_config(RunDir(run_dir).resolved_config).data.shard_dir)
    except ConfigError as error:
        logger.warning("no dataset-shift summary: the run's config cannot be read (%s)", error)
        return None
    if not (training / MANIFEST_NAME).is_file():
        logger.warning("no dataset-shift summary: the training shards %s are not there (no %s)", training,
                       MANIFEST_NAME)
        return None
    same = (training / MANIFEST_NAME).read_bytes() == (Path(evaluated_dir) / MANIFEST_NAME).read_bytes()
    return None if same else training


def split_sample(shard_dir: Path, split: str, limit: int = SAMPLE_IMAGES) -> tuple[list[dict], list[np.ndarray]]:
    """(label records, uint8 pixel arrays) of up to `limit` evenly spaced samples of a split in manifest order;
    a sample that cannot be read is left out."""
    import io

    from PIL import Image

    from csi_dist.data.shards.format import IMAGE_EXTENSIONS, LABEL_EXTENSION, MANIFEST_NAME
    from csi_dist.data.shards.index import index_from_json, index_tar, read_members
    manifest = json.loads((shard_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    positions = []
    for entry in manifest["splits"].get(split, {}).get("shards", []):
        path = shard_dir / entry["path"]
        index = index_from_json(entry["samples"], str(path)) if entry.get("samples") else index_tar(path)
        positions += [(path, sample) for sample in index]
    if not positions:
        return [], []
    picked = np.unique(np.linspace(0, len(positions) - 1, min(limit, len(positions))).round().astype(int))
    labels, images = [], []
    handles: dict[Path, object] = {}
    try:
        for number in picked.tolist():
            path, sample = positions[number]
            handle = handles.setdefault(path, open(path, "rb"))
            try:
                members = read_members(handle, sample)
                extension = next(ext for ext in IMAGE_EXTENSIONS if ext in members)
                raw = members[extension]
                pixels = (np.load(io.BytesIO(raw), allow_pickle=False) if extension == "npy"
                          else np.asarray(Image.open(io.BytesIO(raw)).convert("L")))
                labels.append(json.loads(members[LABEL_EXTENSION]))
                images.append(np.asarray(pixels, dtype=np.uint8))
            except (ValueError, KeyError, OSError, StopIteration) as error:
                logger.debug("dataset shift: sample %s of %s left out: %s", sample.key, path, error)
    finally:
        for handle in handles.values():
            handle.close()
    return labels, images


def intensity_summary(images: list[np.ndarray]) -> dict:
    """Pixel statistics (0-255) over all pixels of `images` (exact, from their histogram), and the count."""
    if not images:
        return {"n_images": 0}
    histogram = sum(np.bincount(image.ravel(), minlength=256) for image in images)
    values = np.arange(256)
    total = histogram.sum()
    mean = float((histogram * values).sum() / total)
    cumulative = np.cumsum(histogram) / total
    return {"n_images": len(images), "mean": mean,
            "std": float(math.sqrt((histogram * (values - mean) ** 2).sum() / total)),
            **{f"p{q}": int(np.searchsorted(cumulative, q / 100)) for q in PERCENTILES}}


@dataclass
class Comparison:
    quantity: str  # in words
    measure: str  # "KS D" or "TVD"
    difference: float
    p_value: float
    new: str  # a summary of the evaluated data, in words
    training: str

    @property
    def strong(self) -> bool:
        return (not math.isnan(self.difference) and self.difference >= DIFFERENCE_THRESHOLD
                and self.p_value < P_THRESHOLD)

    def as_json(self) -> dict:
        return {"quantity": self.quantity, "measure": self.measure, "difference": self.difference,
                "p_value": self.p_value, "strong": self.strong, "evaluated": self.new, "training": self.training}


def compare_values(quantity: str, new: np.ndarray, training: np.ndarray, unit: str = "") -> Comparison:
    """Two-sample KS of a continuous quantity (NaN values left out)."""
    from scipy.stats import ks_2samp
    new, training = (np.asarray(values, dtype=float) for values in (new, training))
    new, training = new[np.isfinite(new)], training[np.isfinite(training)]

    def summary(values: np.ndarray) -> str:
        if not values.size:
            return "none"
        low, middle, high = np.percentile(values, [25, 50, 75])
        return f"median {middle:.3g}{unit} (quartiles {low:.3g}-{high:.3g}), n={values.size}"

    if not (new.size and training.size):
        return Comparison(quantity, "KS D", math.nan, math.nan, summary(new), summary(training))
    result = ks_2samp(new, training)
    return Comparison(quantity, "KS D", float(result.statistic), float(result.pvalue), summary(new),
                      summary(training))


def compare_grades(quantity: str, new_counts: np.ndarray, training_counts: np.ndarray) -> Comparison:
    """Total variation distance of two grade distributions and the chi-square test of their counts."""
    from scipy.stats import chi2_contingency
    new_counts, training_counts = (np.asarray(counts, dtype=float) for counts in (new_counts, training_counts))

    def summary(counts: np.ndarray) -> str:
        shares = counts / counts.sum() if counts.sum() else counts
        return ", ".join(f"{name} {share:.0%}" for name, share in zip(CLASS_NAMES, shares))

    if not (new_counts.sum() and training_counts.sum()):
        return Comparison(quantity, "TVD", math.nan, math.nan, summary(new_counts), summary(training_counts))
    table = np.stack([new_counts, training_counts])
    table = table[:, table.sum(axis=0) > 0]
    difference = 0.5 * float(np.abs(new_counts / new_counts.sum() - training_counts / training_counts.sum()).sum())
    p_value = float(chi2_contingency(table)[1]) if table.shape[1] > 1 else 1.0
    return Comparison(quantity, "TVD", difference, p_value, summary(new_counts), summary(training_counts))


def grade_counts(zone_grades: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(zone_grades, dtype=np.int64).ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES]


def shift_comparisons(shard_dir: Path, split: str, predictions, training_dir: Path, reference) -> tuple[list, dict]:
    """The six comparisons (see the module docstring) and the intensity summaries of both sets."""
    from csi_dist.data.shards.format import MANIFEST_NAME
    from csi_dist.evaluation.metrics import csi_average, expected_csi, zone_predictions
    training_manifest = json.loads((training_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    histogram = training_manifest["splits"][TRAINING_SPLIT].get("label_histogram", {})
    training_grades = np.sum([histogram[zone] for zone in ZONE_NAMES if zone in histogram], axis=0)
    training_labels, training_images = split_sample(training_dir, TRAINING_SPLIT)
    _, new_images = split_sample(Path(shard_dir), split)
    training_zones = np.array([label["zones"] for label in training_labels]).reshape(-1, len(ZONE_NAMES))
    comparisons = [
        compare_grades("zone grades (labels)", grade_counts(predictions.zone_targets),
                       np.asarray(training_grades if np.size(training_grades) else grade_counts(training_zones))),
        compare_values("CSI average (labels)", csi_average(predictions.zone_targets), csi_average(training_zones)),
        compare_values("image brightness (mean pixel value per image)",
                       [image.mean() for image in new_images], [image.mean() for image in training_images]),
        compare_values("image contrast (pixel standard deviation per image)",
                       [image.std() for image in new_images], [image.std() for image in training_images]),
        compare_grades(f"predicted grades (vs the training shards' {REFERENCE_SPLIT} split)",
                       grade_counts(zone_predictions(predictions.zone_probs)),
                       grade_counts(zone_predictions(reference.zone_probs))),
        compare_values(f"predicted CSI, expected grade (vs the training shards' {REFERENCE_SPLIT} split)",
                       expected_csi(predictions.zone_probs), expected_csi(reference.zone_probs)),
    ]
    return comparisons, {"evaluated": intensity_summary(new_images), "training": intensity_summary(training_images)}


def shift_warning(comparisons: list[Comparison]) -> str | None:
    """The plain-language warning naming every strong difference; None when there is none."""
    strong = [comparison for comparison in comparisons if comparison.strong]
    if not strong:
        return None
    named = "; ".join(f"{comparison.quantity} ({comparison.measure} {comparison.difference:.2f})"
                      for comparison in strong)
    return (f"these data differ strongly from the data the model was trained on in {len(strong)} of "
            f"{len(comparisons)} respects: {named}. The metrics measured here describe the model on data unlike its "
            "training data: check how these images were acquired, processed and graded (the table below compares "
            "them) before comparing these results with the internal ones.")


def shift_markdown(split: str, shard_dir: Path, training_dir: Path, comparisons: list[Comparison],
                   intensity: dict, warning: str | None) -> str:
    lines = [f"# Dataset shift: split `{split}` of {shard_dir} against the training data", "",
             f"Training data: {training_dir} (labels and images: its `{TRAINING_SPLIT}` split; the model's "
             f"predictions: its `{REFERENCE_SPLIT}` split). A difference is **strong** when it is at least "
             f"{DIFFERENCE_THRESHOLD:g} (KS D for continuous quantities, total variation distance for grades: the "
             f"largest difference in the share of images, or zones, in some range of values) and its test gives "
             f"p < {P_THRESHOLD:g} (csi_dist/evaluation/dataset_shift.py says why).", ""]
    lines += [f"**WARNING**: {warning}" if warning else
              "No strong difference from the training data was found.", "",
              "| quantity | here | training | difference | p | strong |", "|---|---|---|---|---|---|"]
    for comparison in comparisons:
        difference = "n/a" if math.isnan(comparison.difference) else f"{comparison.measure} {comparison.difference:.3f}"
        p_value = "n/a" if math.isnan(comparison.p_value) else f"{comparison.p_value:.2g}"
        lines.append(f"| {comparison.quantity} | {comparison.new} | {comparison.training} | {difference} | "
                     f"{p_value} | {'**yes**' if comparison.strong else 'no'} |")
    keys = ["n_images", "mean", "std", *(f"p{q}" for q in PERCENTILES)]
    lines += ["", "## Pixel values (0-255) of a sample of images", "", "| statistic | here | training |",
              "|---|---|---|"]
    for key in keys:
        cells = [intensity[name].get(key) for name in ("evaluated", "training")]
        lines.append(f"| {key} | " + " | ".join("n/a" if value is None else
                                                 (f"{value:.1f}" if isinstance(value, float) else str(value))
                                                 for value in cells) + " |")
    return "\n".join(lines) + "\n"


def write_dataset_shift(out_dir: Path, split: str, shard_dir: str | Path, predictions, training_dir: Path,
                        reference) -> str | None:
    """Write <split>_dataset_shift.md and .json (see the module docstring), and a "Dataset shift" paragraph at the
    end of <split>_report.md; returns the warning, or None."""
    from csi_dist.core.files import atomic_write_json
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    comparisons, intensity = shift_comparisons(shard_dir, split, predictions, training_dir, reference)
    warning = shift_warning(comparisons)
    atomic_write_json(out_dir / f"{split}_dataset_shift.json", {
        "split": split, "shard_dir": str(shard_dir), "training_shard_dir": str(training_dir),
        "training_split": TRAINING_SPLIT, "reference_prediction_split": REFERENCE_SPLIT,
        "thresholds": {"difference": DIFFERENCE_THRESHOLD, "p_value": P_THRESHOLD},
        "comparisons": [comparison.as_json() for comparison in comparisons], "pixel_values": intensity,
        "warning": warning})
    (out_dir / f"{split}_dataset_shift.md").write_text(
        shift_markdown(split, shard_dir, training_dir, comparisons, intensity, warning), encoding="utf-8")
    report = out_dir / f"{split}_report.md"
    if report.is_file():  # the split's report says it too, in one paragraph
        name = f"{split}_dataset_shift.md"
        verdict = f"**WARNING**: {warning}" if warning else "No strong difference from the training data was found."
        report.write_text(report.read_text(encoding="utf-8").rstrip("\n") + "\n\n## Dataset shift\n\n"
                          f"Against the training data ({training_dir}): {verdict} Details: [{name}]({name}).\n",
                          encoding="utf-8")
    if warning:
        logger.warning("%s: dataset shift: %s (%s)", split, warning, out_dir / f"{split}_dataset_shift.md")
    return warning
