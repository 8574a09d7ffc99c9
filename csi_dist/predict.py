"""Predict new images: `python -m csi_dist.predict --run-dir RUN (--images DIR | --list CSV) [--out CSV]`.

Grades the 6 lung zones of unlabelled radiographs with a trained run, exactly as training and evaluate see images:
the run's resolved_config.ini and weights, each image resized to the size the run's shards store and saved as they
store it (PNG or JPEG), then brought to the model's input size and normalised, without augmentation.

Inputs:
    --images DIR           every .png, .jpg, .jpeg, .dcm, .nii.gz or .nii file directly in DIR, found as
                           `csi-shards write` finds them (FileID = the file name without its suffix)
    --list CSV             a ';'-separated CSV, rows predicted in their order: with a `path` column, those files
                           (relative paths are relative to the CSV's folder; FileID from a FileID column if there is
                           one, else the file name); else a FileID column (a label CSV works as it is) whose images
                           are looked up in --images DIR like `csi-shards write` looks them up

Outputs (';'-separated, rows in input order):
    --out CSV              FileID, path, per zone <zone>_pred (the most likely grade, 4 = unknown) and
                           <zone>_p_<class> for the 5 classes, csi_avg_pred (empty when every zone is predicted
                           unknown), csi_expected_pred, ahf_class_pred (-1 when the average is undefined),
                           probabilities (raw, or calibrated with --calibrated): evaluate's column names
    <out stem>_errors.csv  FileID, path, reason for every file that could not be read (missing, corrupt)

Runs on 1..N processes like evaluate (`python -m csi_dist.launcher ... -m csi_dist.predict ...`), the files split
across them. Exit codes: 0 when at least one image was predicted; 2 when the inputs are wrong (no run directory,
config or weights; no such folder or CSV; no images; --calibrated without a calibration of the weights) or no image
could be read; 75 (nothing written; rerun the same command) when a preemption notice arrived (SIGTERM, SIGUSR1,
SIGUSR2, Ctrl-C, or the file <run dir>/PREEMPT_REQUESTED).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from csi_dist.core.command import run_command
from csi_dist.core.config import ConfigError, load_run_config
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR

# torch, pandas and the model are imported after the arguments and the run's config are checked: `--help`, a usage
# error and a config error are answered in a second (issue 34). The work itself: csi_dist.evaluation.prediction.

log = logging.getLogger("csi_dist.predict")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.predict", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--run-dir", type=Path, required=True, metavar="RUN",
                        help="a training run directory (required)")
    parser.add_argument("--weights", default="best", metavar="best|last|PATH",
                        help="the run's best weights, its last ones, or a .safetensors file (default: best; the last "
                             "weights when the run saved no best)")
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="folder of images (or, with a FileID --list, where they are); --images or --list is "
                             "required")
    parser.add_argument("--list", dest="list_csv", type=Path, metavar="CSV",
                        help="';'-separated CSV with a path column, or a FileID column (with --images)")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"), metavar="CSV",
                        help="the predictions CSV (default: predictions.csv)")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="images per forward pass (default: the run's training.batch_size)")
    parser.add_argument("--heatmaps", type=int, default=0, metavar="N",
                        help="Grad-CAM maps of each zone for the first N predicted images, in <out stem>_heatmaps/ "
                             "(default: 0, none)")
    parser.add_argument("--calibrated", action="store_true",
                        help="temperature-scaled probabilities, with the temperatures evaluate fitted on the val split "
                             "for these weights (default: off, the raw probabilities)")
    args = parser.parse_args(argv)
    if args.images is None and args.list_csv is None:
        parser.error("give --images DIR or --list CSV")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: expected a positive number")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_run_config(args.run_dir)
    except ConfigError as error:  # answered before torch loads
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    from csi_dist.core.distributed import LaunchError, leave_process_group
    from csi_dist.evaluation.calibration import CalibrationError
    from csi_dist.evaluation.prediction import PredictError, predict
    from csi_dist.model.factory import ModelError
    from csi_dist.training.checkpoint_files import CheckpointError
    try:
        predict(config, args.run_dir, args.weights, args.images, args.list_csv, args.out, args.batch_size,
                args.heatmaps, args.calibrated)
    except (PredictError, ConfigError, ModelError, CheckpointError, LaunchError, CalibrationError) as error:
        log.error("%s", error)
        leave_process_group()
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    run_command(main)
