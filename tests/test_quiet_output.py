"""Our commands print our messages only: no third-party noise such as DeepSpeed's "Setting accelerator to CPU"
(issue 34 item 5). accelerate's `unwrap_model` imported DeepSpeed, whose accelerator probe warns on a machine
without a GPU; evaluate and predict called it for their heatmaps. The demo hid it with DS_ACCELERATOR=cpu, users
running the commands did not."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env

# evaluate, then predict, both with heatmaps, in one interpreter (torch loads once); then says whether DeepSpeed loaded
SCRIPT = """
import sys
from csi_dist import evaluate, predict
run_dir, images, out = sys.argv[1:]
status = evaluate.main(["--run-dir", run_dir, "--splits", "test", "--heatmaps", "1", "--out", out + "/evaluation"])
status = status or predict.main(["--run-dir", run_dir, "--images", images, "--out", out + "/predictions.csv",
                                 "--heatmaps", "1"])
print("deepspeed imported:", "deepspeed" in sys.modules, file=sys.stderr)
sys.exit(status)
"""


@pytest.mark.slow
def test_evaluate_and_predict_with_heatmaps_print_no_deepspeed_noise(trained_run: Path, phantom_shards: Path,
                                                                    tmp_path: Path):
    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((phantom_shards / "raw" / "images").glob("*.png"))[:2]:
        (images / source.name).symlink_to(source)
    env = subprocess_env()
    del env["DS_ACCELERATOR"]  # what a user's shell has: nothing
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(trained_run), str(images), str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert len(list((tmp_path / "out" / "evaluation" / "heatmaps" / "test").glob("*_zones.png"))) == 1
    assert len(list((tmp_path / "out" / "predictions_heatmaps").glob("*_zones.png"))) == 1
    assert "Setting accelerator" not in output and "real_accelerator" not in output, output[-4000:]
    assert "deepspeed imported: False" in result.stderr
