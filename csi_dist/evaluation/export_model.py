"""Export a trained run for another inference stack: an ONNX or TorchScript file that maps normalised images to zone
probabilities (per-zone temperatures folded in when calibrated), and a sidecar JSON saying how to feed it."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from csi_dist.core.config import Config
from csi_dist.data.transforms import NORMALIZATION
from csi_dist.core.domain import CLASS_NAMES, NUM_CLASSES, NUM_ZONES, ZONE_NAMES
from csi_dist.evaluation.calibration import calibration_path, read_calibration
from csi_dist.evaluation.trained_model import trained_model, weights_path
from csi_dist.core.files import atomic_path, atomic_write_json
from csi_dist.model.factory import INPUT_CHANNELS
from csi_dist.core.provenance import now_utc, read_provenance, sha256_of
from csi_dist.core.run_dir import RunDir
from csi_dist.core.weights import CheckpointError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
FILE_SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
ONNX_OPSET = 17  # LayerNormalization is native from 17 on: the ViT (RadDINO) exports without decomposition
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"
EXAMPLE_BATCH = 2  # the batch traced; the exported batch dimension is dynamic


class ExportError(ValueError):
    """An export that cannot be made as asked: an unknown format."""


class ZoneProbabilities(nn.Module):
    """The CSI model with the softmax of each zone inside: images -> B x 6 x 5 probabilities, zone z's logits divided
    by temperatures[z] first (all 1 when uncalibrated)."""

    def __init__(self, model: nn.Module, temperatures: list[float] | None = None):
        super().__init__()
        self.model = model
        scale = torch.tensor(temperatures or [1.0] * NUM_ZONES, dtype=torch.float32)
        self.register_buffer("temperatures", scale.view(1, NUM_ZONES, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(images) / self.temperatures, dim=-1)


def default_export_path(run_dir: Path, weights_file: Path, export_format: str, calibrated: bool) -> Path:
    """`<run_dir>/export/<weights stem>[.calibrated].onnx` (or `.torchscript.pt`)."""
    name = weights_file.stem + (".calibrated" if calibrated else "")
    return RunDir(run_dir).export / f"{name}{FILE_SUFFIXES[export_format]}"


def sidecar_path(model_file: Path) -> Path:
    return model_file.with_name(f"{model_file.name}.json")


def write_onnx(module: nn.Module, example: torch.Tensor, out: Path) -> None:
    """TorchScript-based ONNX export: it needs only the onnx package (the torch.export-based one also needs
    onnxscript) and exports every backbone, ViT included, with a dynamic batch dimension."""
    with atomic_path(out) as temporary, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # timm's input size checks: fixed here
        torch.onnx.export(module, (example,), str(temporary), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def write_torchscript(module: nn.Module, example: torch.Tensor, out: Path) -> None:
    """A traced TorchScript module (tracing follows timm's models where scripting does not); the batch size is read
    from the input at run time, so any batch works."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    with atomic_path(out) as temporary, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated.*")
        torch.jit.save(traced, str(temporary))


def sidecar(config: Config, image_size: int, export_format: str, model_file: Path, weights_file: Path,
            weights_sha256: str | None, temperatures: list[float] | None, calibration_file: Path | None,
            code_commit: str | None) -> dict:
    """What an inference stack needs to feed the file and read its output, and where the file came from."""
    mean, std = NORMALIZATION[config.data.normalization]
    return {
        "format": export_format,
        "file": model_file.name,
        "model_arch": config.model.model_arch,
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "shape": ["batch", INPUT_CHANNELS, image_size, image_size],
            "channels": INPUT_CHANNELS, "height": image_size, "width": image_size,
            "pixel_value_range": [0, 255],
            "preprocessing": f"grayscale, resized to {image_size} x {image_size} (bilinear, whole image, aspect ratio "
                             f"not kept), then (pixel / 255 - mean) / std",
            "normalization": {"name": config.data.normalization, "mean": mean, "std": std},
            "value_range": [(0.0 - mean) / std, (1.0 - mean) / std],
        },
        "output": {
            "name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", NUM_ZONES, NUM_CLASSES],
            "meaning": "probabilities: softmax over the classes of each zone (each row of 5 sums to 1)",
            "zone_names": list(ZONE_NAMES), "class_names": list(CLASS_NAMES),
        },
        "calibrated": temperatures is not None,
        "temperatures": temperatures,
        "calibration_file": str(calibration_file) if calibration_file else None,
        "weights": str(weights_file.resolve()),
        "weights_sha256": weights_sha256,
        "code_commit": code_commit,
        "onnx_opset": ONNX_OPSET if export_format == "onnx" else None,
        "torch_version": torch.__version__,
        "exported_utc": now_utc(),
    }


def export_run(config: Config, run_dir: Path, weights: str, export_format: str, out: Path | None = None,
               calibrated: bool = False) -> Path:
    """Writes the run's model as `export_format` (`out`, or the default beside the run) and its sidecar JSON;
    returns the model file's path."""
    if export_format not in FORMATS:
        raise ExportError(f"format {export_format!r}: expected one of {', '.join(FORMATS)}")
    weights_file = weights_path(run_dir, weights)
    if not weights_file.is_file():  # said before a missing calibration file beside it
        raise CheckpointError(f"weights file not found: {weights_file}")
    weights_sha256 = sha256_of(weights_file)
    calibration_file = calibration_path(weights_file) if calibrated else None
    # a missing calibration (CalibrationError) is reported before the model is built (seconds for a ViT)
    temperatures = None
    if calibrated:
        temperatures = [float(value) for value in read_calibration(weights_file)["temperatures"]]
    model, weights_file, image_size = trained_model(config, run_dir, weights)
    out = Path(out) if out else default_export_path(run_dir, weights_file, export_format, calibrated)
    module = ZoneProbabilities(model, temperatures).eval()
    example = torch.randn(EXAMPLE_BATCH, INPUT_CHANNELS, image_size, image_size,
                          generator=torch.Generator().manual_seed(0))  # leaves the global random stream alone
    (write_onnx if export_format == "onnx" else write_torchscript)(module, example, out)
    code_commit = read_provenance(run_dir).get("origin", {}).get("code", {}).get("commit")
    atomic_write_json(sidecar_path(out), sidecar(config, image_size, export_format, out, weights_file, weights_sha256,
                                                 temperatures, calibration_file, code_commit))
    log.info("%s (%s, %s, input %d x %d x %d, output B x %d x %d probabilities%s) and its sidecar %s", out,
             export_format, config.model.model_arch, INPUT_CHANNELS, image_size, image_size, NUM_ZONES, NUM_CLASSES,
             ", temperatures folded in" if temperatures else "", sidecar_path(out).name)
    return out
