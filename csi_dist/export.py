"""Export a trained model: `python -m csi_dist.export --run-dir RUN --format onnx|torchscript [--calibrated]`.

Writes one file another inference stack can run without csi_dist: ONNX (onnxruntime, TensorRT, ...) or TorchScript
(torch.jit.load, LibTorch). It takes float32 images B x 1 x H x W, normalised as in training, and returns the
probabilities B x 6 x 5 (softmax over the 5 classes of each zone; any batch size). Beside it, <file>.json says the
input size, normalisation (mean, std), pixel range, zone and class order, the temperatures when calibrated, and the
sha256 of the weights and the code commit the run was trained with.

--calibrated folds the per-zone temperatures of <run dir>/weights/<best|last>.calibration.json into the file
(probabilities of zone z = softmax(logits_z / T_z)). Exit codes: 0 written; 2 the inputs are wrong (no run
directory, config, weights or calibration file).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from csi_dist.core.command import run_command
from csi_dist.core.config import ConfigError, load_run_config
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.core.run_dir import CALIBRATION_SUFFIX

# torch, onnx and the model are imported after the arguments and the run's config are checked: `--help`, a usage
# error and a config error are answered in a second. The work itself: csi_dist.evaluation.export_model.

log = logging.getLogger("csi_dist.export")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.export", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--run-dir", type=Path, required=True, metavar="RUN",
                        help="a training run directory (required)")
    parser.add_argument("--weights", default="best", metavar="best|last|PATH",
                        help="the run's best weights, its last ones, or a .safetensors file (default: best; the last "
                             "weights when the run saved no best)")
    parser.add_argument("--format", dest="export_format", required=True, choices=("onnx", "torchscript"),
                        help="onnx (opset 17) or torchscript (required)")
    parser.add_argument("--out", type=Path, metavar="PATH",
                        help="the model file (default: <run dir>/export/<best|last>[.calibrated].onnx or "
                             ".torchscript.pt); the sidecar is PATH.json")
    parser.add_argument("--calibrated", action="store_true",
                        help=f"fold the temperatures of <best|last>{CALIBRATION_SUFFIX} into the file (default: off, "
                             "the uncalibrated probabilities)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = load_run_config(args.run_dir)
    except ConfigError as error:  # answered before torch loads
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    from csi_dist.evaluation.calibration import CalibrationError
    from csi_dist.evaluation.export_model import ExportError, export_run
    from csi_dist.model.factory import ModelError
    from csi_dist.training.checkpoint_files import CheckpointError
    try:
        export_run(config, args.run_dir, args.weights, args.export_format, args.out, args.calibrated)
    except (ExportError, CalibrationError, ConfigError, ModelError, CheckpointError) as error:
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    run_command(main)
