"""Export (issue 31, item 6): for every backbone the ONNX file run by onnxruntime and the TorchScript file run by
torch.jit.load give the PyTorch model's zone probabilities within 1e-4 (fp32), at any batch size; `--calibrated`
folds in the per-zone temperatures (checked against scipy's softmax of logits / T); the sidecar says how to feed the
file. Models are random (never downloaded) and at the smallest input each backbone takes: the ViT (RadDINO) at 2 x 2
patches of 14 px, built for that size as `data.image_size` builds it in training."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax

from conftest import REPO_ROOT, subprocess_env
from csi_dist import export as export_command
from csi_dist.core.config import Config, ModelConfig, load_config, save_config
from csi_dist.core.domain import CLASS_NAMES, ZONE_NAMES
from csi_dist.evaluation.calibration import CalibrationError
from csi_dist.evaluation.export_model import export_run
from csi_dist.model.factory import build_model
from csi_dist.training.checkpoint_files import load_weights, save_weights

onnxruntime = pytest.importorskip("onnxruntime")

# (model_arch, the smallest image side it is tested at): the CNNs at 64 px (Tiny_CNN at the phantom's 32), any timm
# name (here ConvNeXt, whose LayerNorm and GELU the ResNets lack), RadDINO (ViT-B/14) at 28 px
BACKBONES = [("Tiny_CNN", 32), ("Custom_1", 64), ("ResNet50", 64), ("CheXNet", 64), ("convnext_atto", 64),
             ("RadDINO", 28)]
TOLERANCE = 1e-4
TEMPERATURES = [0.5, 1.0, 2.0, 3.0, 0.7, 1.5]  # one per zone, far enough from 1 to move every probability


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(images).numpy()


def zone_logits(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(images).numpy().astype(np.float64)


def fake_run(run_dir: Path, model_arch: str, image_size: int) -> torch.nn.Module:
    """A run directory as training leaves it (resolved config, weights/best.safetensors) around a random model of
    `model_arch`; returns that model."""
    config = Config()
    config.model.model_arch = model_arch
    config.data.image_size = image_size
    torch.manual_seed(0)
    model = build_model(config.model, image_size).eval()
    save_config(config, run_dir / "resolved_config.ini")
    save_weights(model.state_dict(), run_dir / "weights" / "best.safetensors")
    return model


@pytest.fixture(scope="module", params=BACKBONES, ids=[arch for arch, _ in BACKBONES])
def backbone_run(request, tmp_path_factory) -> tuple[Path, torch.nn.Module, int]:
    model_arch, image_size = request.param
    run_dir = tmp_path_factory.mktemp(model_arch)
    return run_dir, fake_run(run_dir, model_arch, image_size), image_size


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_exported_file_gives_the_models_probabilities_for_every_backbone(backbone_run, export_format: str):
    run_dir, model, image_size = backbone_run
    config = load_config(run_dir / "resolved_config.ini")
    path = export_run(config, run_dir, "best", export_format)
    generator = torch.Generator().manual_seed(1)
    for batch in (2, 3):  # exported with a batch of 2; the batch dimension is dynamic
        images = torch.randn(batch, 1, image_size, image_size, generator=generator)
        exported = (run_onnx if export_format == "onnx" else run_torchscript)(path, images)
        expected = softmax(zone_logits(model, images), axis=-1)
        assert exported.shape == (batch, 6, 5)
        assert exported.dtype == np.float32
        assert np.abs(exported - expected).max() <= TOLERANCE


@pytest.fixture
def weights_copy(trained_run: Path, tmp_path: Path) -> Path:
    """The trained run's weights copied out (`--weights PATH`), so calibration files written beside them stay out of
    the run directory other tests share."""
    copy = tmp_path / "weights" / "trained.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(trained_run / "weights" / "best.safetensors", copy)
    return copy


def write_calibration(weights: Path, temperatures: list[float], weights_sha256: str | None = None) -> Path:
    """`<stem>.calibration.json` beside `<stem>.safetensors`, as the calibration helper's contract describes it."""
    path = weights.with_name(f"{weights.stem}.calibration.json")
    path.write_text(json.dumps({
        "zone_names": list(ZONE_NAMES), "temperatures": temperatures,
        "fitted_on": {"split": "val", "shard_dir": "shards", "manifest_sha256": "0" * 64, "n_images": 24},
        "weights_sha256": weights_sha256 or hashlib.sha256(weights.read_bytes()).hexdigest(),
        "nll_before": 1.2, "nll_after": 1.1}))
    return path


def trained_tiny_model(run_dir: Path) -> torch.nn.Module:
    """The trained run's model, built and loaded here without the export code."""
    model = build_model(ModelConfig(model_arch="Tiny_CNN"), 32)
    model.load_state_dict(load_weights(run_dir / "weights" / "best.safetensors"))
    return model.eval()


def test_the_command_exports_a_trained_run_that_onnxruntime_runs(trained_run: Path, tmp_path: Path):
    out = tmp_path / "model.onnx"
    result = subprocess.run([sys.executable, "-m", "csi_dist.export", "--run-dir", str(trained_run), "--format", "onnx",
                             "--out", str(out)], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    images = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = softmax(zone_logits(trained_tiny_model(trained_run), images), axis=-1)
    assert np.abs(run_onnx(out, images) - expected).max() <= TOLERANCE
    assert Path(f"{out}.json").is_file()


@pytest.mark.parametrize("export_format", ["onnx", "torchscript"])
def test_calibrated_export_folds_in_each_zones_temperature(trained_run: Path, weights_copy: Path, tmp_path: Path,
                                                          export_format: str):
    write_calibration(weights_copy, TEMPERATURES)
    out = tmp_path / f"calibrated.{export_format}"
    assert export_command.main(["--run-dir", str(trained_run), "--weights", str(weights_copy), "--format",
                                export_format, "--calibrated", "--out", str(out)]) == 0
    images = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    logits = zone_logits(trained_tiny_model(trained_run), images)
    expected = softmax(logits / np.array(TEMPERATURES)[None, :, None], axis=-1)
    exported = (run_onnx if export_format == "onnx" else run_torchscript)(out, images)
    assert np.abs(exported - expected).max() <= TOLERANCE
    assert np.abs(exported - softmax(logits, axis=-1)).max() > 100 * TOLERANCE  # the temperatures did change them


def test_calibrated_without_a_calibration_file_is_exit_2_naming_it(trained_run: Path, weights_copy: Path,
                                                                   tmp_path: Path, caplog):
    out = tmp_path / "model.onnx"
    assert export_command.main(["--run-dir", str(trained_run), "--weights", str(weights_copy), "--format", "onnx",
                                "--calibrated", "--out", str(out)]) == 2
    assert str(weights_copy.with_name("trained.calibration.json")) in caplog.text and "--calibrated" in caplog.text
    assert not out.exists()


def test_missing_weights_are_exit_2_naming_them_before_the_calibration(trained_run: Path, tmp_path: Path, caplog):
    missing = tmp_path / "none.safetensors"
    assert export_command.main(["--run-dir", str(trained_run), "--weights", str(missing), "--format", "onnx",
                                "--calibrated", "--out", str(tmp_path / "model.onnx")]) == 2
    assert f"weights file not found: {missing}" in caplog.text and "calibration" not in caplog.text


def test_a_calibration_fitted_for_other_weights_is_refused(trained_run: Path, weights_copy: Path, tmp_path: Path):
    write_calibration(weights_copy, TEMPERATURES, weights_sha256="f" * 64)
    with pytest.raises(CalibrationError, match="fitted for other weights"):
        export_run(load_config(trained_run / "resolved_config.ini"), trained_run, str(weights_copy), "onnx",
                   tmp_path / "model.onnx", calibrated=True)


def test_sidecar_says_how_to_feed_the_file_and_where_it_came_from(trained_run: Path, weights_copy: Path,
                                                                  tmp_path: Path):
    write_calibration(weights_copy, TEMPERATURES)
    out = tmp_path / "model.torchscript.pt"
    assert export_command.main(["--run-dir", str(trained_run), "--weights", str(weights_copy), "--format",
                                "torchscript", "--calibrated", "--out", str(out)]) == 0
    sidecar = json.loads(Path(f"{out}.json").read_text())
    provenance = json.loads((trained_run / "provenance.json").read_text())
    weights = trained_run / "weights" / "best.safetensors"
    assert sidecar["format"] == "torchscript" and sidecar["model_arch"] == "Tiny_CNN"
    assert sidecar["input"]["shape"] == ["batch", 1, 32, 32]
    assert (sidecar["input"]["channels"], sidecar["input"]["height"], sidecar["input"]["width"]) == (1, 32, 32)
    # configs/demo.ini trains with the "medical" normalisation: [0, 1] -> [-1, 1]
    assert sidecar["input"]["normalization"] == {"name": "medical", "mean": 0.5, "std": 0.5}
    assert sidecar["input"]["pixel_value_range"] == [0, 255] and sidecar["input"]["value_range"] == [-1.0, 1.0]
    assert sidecar["output"]["shape"] == ["batch", 6, 5]
    assert sidecar["output"]["zone_names"] == ["right_sup", "left_sup", "right_mid", "left_mid", "right_inf",
                                               "left_inf"] == list(ZONE_NAMES)
    assert sidecar["output"]["class_names"] == list(CLASS_NAMES)
    assert sidecar["calibrated"] is True and sidecar["temperatures"] == TEMPERATURES
    assert sidecar["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sidecar["code_commit"] == provenance["origin"]["code"]["commit"] and sidecar["code_commit"]
