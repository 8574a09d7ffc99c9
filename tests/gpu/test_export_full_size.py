"""Export at the backbones' native input sizes (issue 31, item 6): RadDINO at 518 px (1369 patch tokens), ResNet50
and CheXNet at 224 px, each exported to ONNX and TorchScript through the command's library and run by onnxruntime
and torch.jit.load, within 1e-4 of the PyTorch model's probabilities in fp32. The CPU suite checks every backbone at
its smallest input (tests/test_export.py); RadDINO at 518 px takes minutes on CI's 2 cores, so this tier runs it on
the GPU machine's CPUs (the exported files are checked on the CPU, where a deployment's reference runs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from csi_dist.core.config import load_config
from csi_dist.evaluation.export_model import export_run
from test_export import TOLERANCE, fake_run, run_onnx, run_torchscript, zone_logits

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU tier needs CUDA")]

NATIVE_SIZES = [("RadDINO", 518), ("ResNet50", 224), ("CheXNet", 224)]


@pytest.mark.parametrize(("model_arch", "image_size"), NATIVE_SIZES, ids=[arch for arch, _ in NATIVE_SIZES])
def test_exported_files_at_native_size_give_the_models_probabilities(tmp_path, model_arch: str, image_size: int):
    model = fake_run(tmp_path, model_arch, image_size)
    config = load_config(tmp_path / "resolved_config.ini")
    images = torch.randn(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(1))
    expected = softmax(zone_logits(model, images), axis=-1)
    for export_format, run_file in (("onnx", run_onnx), ("torchscript", run_torchscript)):
        exported = run_file(export_run(config, tmp_path, "best", export_format), images)
        assert exported.shape == (2, 6, 5)
        assert np.abs(exported - expected).max() <= TOLERANCE, export_format
