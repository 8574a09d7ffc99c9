"""The commands answer at once (issue 34): `--help`, a usage error and a config error (an unknown key, a bad value)
come before torch is imported, and `--help` shows every default in user words.

Each case runs the command's `__main__` in a fresh interpreter whose exit hook prints whether torch was imported: no
timing, so the test holds on a loaded machine, and each process costs a fraction of a second once torch stays out.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env

# runs `python -m MODULE ARGS...` in this interpreter, then says on stderr whether torch was loaded by then
PROBE = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('torch imported:', 'torch' in sys.modules, file=sys.stderr))\n"
         "sys.argv = sys.argv[1:]\n"
         "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")

# function and module names a user cannot act on (issue 34, item 3)
INTERNAL_NAMES = ("evaluate.weights_path", "images.encode_image_file", "radiographs.encode_image_file",
                  "transforms.decode_image", "cluster.preemption", "build_image_index", "IMAGE_SUFFIXES",
                  "to_model_input", "prepare_multi_gpu_env", "_shutdown", "csi_dist/", ".main(")


def run(module: str, *args: str, cwd: Path = REPO_ROOT) -> tuple[int, str]:
    """(exit status, stdout and stderr) of `python -m module args`, with torch's import asserted absent."""
    result = subprocess.run([sys.executable, "-c", PROBE, module, *args], capture_output=True, text=True, cwd=cwd,
                            env=subprocess_env(), timeout=120)
    output = result.stdout + result.stderr
    assert "torch imported: False" in result.stderr, f"{module} {' '.join(args)} imported torch:\n{output[-3000:]}"
    return result.returncode, output


def bad_run_dir(tmp_path: Path) -> Path:
    """A run directory whose resolved_config.ini has a misspelt key."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000004" / "state").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000004" / "state" / ".metadata").write_bytes(b"")
    (run_dir / "resolved_config.ini").write_text("[Training]\nbatch_sise = 8\n")
    (tmp_path / "images").mkdir()
    return run_dir


# (command, texts its --help must show: the defaults, in user words)
HELP_DEFAULTS = [
    ("csi_dist.train", ["(default: auto)", "<logging.output_dir>/<logging.run_name>", "--help-config",
                        "several processes: `python -m csi_dist.launcher --config_file"]),
    ("csi_dist.evaluate", ["(default: best", "(default: val test)", "(default: 0", "<run dir>/evaluation",
                           "the run's own data.shard_dir", "(default: 1000; 0: no intervals)",
                           "(default: off, the raw probabilities"]),
    ("csi_dist.predict", ["(default: best", "(default: predictions.csv)", "(default: the run's training.batch_size)",
                          "(default: 0", "empty when every zone", "(default: off, the raw probabilities"]),
    ("csi_dist.convert", ["checkpoints/step-", ".safetensors"]),
    ("csi_dist.export", ["(default: best", "(default: <run dir>/export/", "(default: off", "B x 6 x 5",
                         "calibration.json"]),
    ("csi_dist.bench", ["(default: resnet50@224x256 and densenet121@512x64)", "(default: 20)", "(default: 3)", "(default: 10)",
                        "(default: 60)", "(default: ddp)", "(default: auto", "(default: png)",
                        "(default: data/bench)", "(default: one per CPU core, at most 16"]),
    ("csi_dist.lineage", ["RUN_DIR", "provenance.json"]),
    ("csi_dist.shards", ["(default 200)", "(default data/demo_shards)", "(default 128)", "(default: all cores)",
                         "(default png;", "write,verify,show"]),
    ("csi_dist.sweep", ["(default: the built-in defaults)", "(default: 50)", "(default: 4)", "(default: 2)",
                        "(default: 1440, one day)", "(default: 10)", "(default: 60)", "configs/sweep/default.yaml"]),
    ("csi_dist.compare", ["RUN_A", "RUN_B", "(default: test)", "(default: 1000)", "(default: 0)",
                          "(default: RUN_B's evaluation folder)", "Exit status: 0"]),
    ("csi_dist.launcher", ["accelerate launch --help", "--config_file", "Exit status: 0", "75", "one process"]),
    ("csi_dist.submit", ["(default: 1)", "(default: 0", "(default: 1440", "(default: csi-train)",
                         "(default: logs/submitit)", "(default: one per GPU, or 1 on CPU)", "(default: SLURM's",
                         "(default: the cluster's default partition)", "runs/<job name>-<date>"]),
]


@pytest.mark.parametrize(("module", "shown"), HELP_DEFAULTS, ids=[module for module, _ in HELP_DEFAULTS])
def test_help_shows_every_default_without_torch_or_internal_names(module: str, shown: list[str]):
    status, output = run(module, "--help")
    assert status == 0, output
    flat = " ".join(output.split())  # argparse wraps lines where it likes
    assert [text for text in shown if text not in flat] == [], output
    assert [name for name in INTERNAL_NAMES if name in output] == [], output
    assert len(re.findall(r"^usage:", output, flags=re.MULTILINE)) <= 1, output


def test_predict_help_says_what_the_readme_and_the_code_say_once():
    from csi_dist.cluster.preemption import REQUEST_FILE_NAME
    from csi_dist.data.radiographs import IMAGE_SUFFIXES
    _, output = run("csi_dist.predict", "--help")
    assert "NaN" not in output  # the CSV cell is empty (README "Prediction on new images")
    assert "Options:" not in output  # argparse lists the options once
    flat = " ".join(output.split())
    assert [suffix for suffix in IMAGE_SUFFIXES if f"{suffix} " not in flat and f"{suffix}," not in flat] == []
    assert f"<run dir>/{REQUEST_FILE_NAME}" in flat


# (command, arguments, exit status, what the message says)
USAGE_ERRORS = [
    ("csi_dist.train", ["--bogus"], 2, "unrecognized arguments: --bogus"),
    ("csi_dist.evaluate", ["--splits", "test"], 2, "--run-dir"),
    ("csi_dist.predict", ["--run-dir", "run"], 2, "give --images DIR or --list CSV"),
    ("csi_dist.convert", [], 2, "checkpoint"),
    ("csi_dist.export", ["--run-dir", "run"], 2, "--format"),
    ("csi_dist.bench", ["--case", "resnet50"], 2, "ARCH@SIZExBATCH"),
    ("csi_dist.lineage", [], 2, "RUN_DIR"),
    ("csi_dist.shards", [], 2, "give a command (write, verify or show) or --demo N"),
    ("csi_dist.shards", ["write", "--csv", "labels.csv"], 2, "--images"),
    ("csi_dist.sweep", ["--n-trials", "many"], 2, "--n-trials"),
    ("csi_dist.compare", ["run_a"], 2, "RUN_B"),
    ("csi_dist.launcher", [], 2, "accelerate launch"),
    ("csi_dist.launcher", ["--config_file", "no_such.yaml", "-m", "csi_dist.train"], 2, "no_such.yaml"),
    ("csi_dist.submit", ["--nodes", "two"], 2, "--nodes"),
]


@pytest.mark.parametrize(("module", "args", "status", "message"), USAGE_ERRORS,
                         ids=[f"{module}{' ' + ' '.join(args) if args else ''}" for module, args, _, _ in USAGE_ERRORS])
def test_a_usage_error_is_answered_before_torch(module: str, args: list[str], status: int, message: str):
    returned, output = run(module, *args)
    assert returned == status, output
    assert message in output, output
    assert "Traceback" not in output, output


def config_error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    run_dir = bad_run_dir(tmp_path)
    bad = "unknown key 'batch_sise'"
    demo = str(REPO_ROOT / "configs" / "demo.ini")
    return {
        "train unknown key": (["csi_dist.train", "--config", demo, "--set", "training.batch_sise=8"], bad),
        "train bad value": (["csi_dist.train", "--config", demo, "--set", "training.batch_size=many"],
                            "expected int, got 'many'"),
        "evaluate": (["csi_dist.evaluate", "--run-dir", str(run_dir)], bad),
        "predict": (["csi_dist.predict", "--run-dir", str(run_dir), "--images", str(tmp_path / "images")], bad),
        "convert": (["csi_dist.convert", str(run_dir / "checkpoints" / "step-00000004"), str(tmp_path / "w.st")],
                    bad),
        "bench": (["csi_dist.bench", "--set", "training.batch_sise=8", "--work-dir", str(tmp_path / "bench")], bad),
        # checked before the job is queued (it was found only when the job ran, after its wait in the queue)
        "submit": (["csi_dist.submit", "--local", "--log-dir", str(tmp_path / "submitit"), "--config", demo,
                    "--set", "training.batch_sise=8"], f"nothing submitted: override 'training.batch_sise=8': {bad}"),
        "export": (["csi_dist.export", "--run-dir", str(run_dir), "--format", "onnx"], bad),
    }


@pytest.mark.parametrize("case", ["train unknown key", "train bad value", "evaluate", "predict", "convert", "bench",
                                  "submit", "export"])
def test_a_config_error_is_exit_2_naming_the_key_before_torch(tmp_path: Path, case: str):
    args, message = config_error_cases(tmp_path)[case]
    status, output = run(*args)
    assert status == 2, output
    assert message in output, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "submitit").exists()  # submit: no job
