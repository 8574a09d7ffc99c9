"""Shared fixtures: free ports, the repository's python, environment for launched processes."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for launched trainers: CPU gloo and no GPU in sight (the CPU tier behaves the same on a GPU host:
    there accelerate's barrier would pick a GPU per rank), offline W&B, quiet DeepSpeed probing."""
    env = dict(os.environ)
    env.update({"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline",
                "WANDB_SILENT": "true", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))})
    env.update(extra)
    return env


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", *args]


def pytest_configure(config):
    from promises import PromiseCheck  # the README's promises: each named test must pass in a whole-suite run
    config.pluginmanager.register(PromiseCheck(config), "csi-promises")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(out)` done once per test session, however many pytest-xdist workers run it: the first worker to ask
    builds under a file lock in the directory all workers' temporary directories share; the others wait and reuse
    it. A build that failed is retried by the next worker to ask."""
    from filelock import FileLock
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def phantom_shards(tmp_path_factory) -> Path:
    """160 phantom radiographs at 32 px in shards (114 train, 24 val, 22 test), shared read-only by the trainer,
    strategy and parity tests (and by every worker)."""
    from csi_dist.data.shards.writer import write_demo
    return built_once(tmp_path_factory, "phantom_shards",
                      lambda out: write_demo(str(out), n_images=160, image_size=32, seed=1, workers=2))


def train_and_evaluate_tiny_run(shards: Path, run_dir: Path) -> None:
    for args in (["-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir),
                  "--set", f"data.shard_dir={shards}", "--set", "training.n_epochs=1",
                  "--set", "training.batch_size=8", "--set", "data.image_size=32", "--set", "training.num_workers=2",
                  "--set", "model.model_arch=Tiny_CNN",
                  "--set", "logging.wandb_mode=disabled", "--set", "heatmap.enabled=true",
                  "--set", "heatmap.every_epoch=true", "--set", "heatmap.color_map=custom_purple_red"],
                 ["-m", "csi_dist.evaluate", "--run-dir", str(run_dir), "--splits", "test", "--heatmaps", "2"]):
        result = subprocess.run([sys.executable, *args], env=subprocess_env(), cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="session")
def trained_run(phantom_shards, tmp_path_factory) -> Path:
    """A tiny run on the phantom (Tiny_CNN, 1 epoch, 32 px, the seed's heatmap settings on) and its evaluation of the
    test split (with the zone heatmaps of 2 images), shared by the evaluate, predict, heatmap and provenance tests.
    Trained once; each worker gets its own copy (tests leave preemption notices in it). Tests may add files to it
    but must leave what is there unchanged."""
    built = built_once(tmp_path_factory, "trained_run", lambda out: train_and_evaluate_tiny_run(phantom_shards, out))
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(built, run_dir)
    return run_dir

CLUSTER_FILES = "test_slurm*.py"  # the tests that drive the SLURM cluster live in these files, and only there
# The other files that take longest (1.5-6 min each alone on a 2-core machine), longest first, after the cluster's:
# pytest-xdist hands out whole files, so a long one started last would keep its worker busy while the others idle.
LONGEST_FILES = ("test_faults.py", "test_elastic.py", "test_train.py", "test_parity.py", "test_preemption.py",
                 "test_heatmaps.py", "test_strategies.py", "test_outcomes.py", "test_bench.py", "test_predict.py")


def pytest_collection_modifyitems(config, items):
    misplaced = [item.nodeid for item in items
                 if item.get_closest_marker("slurm") and not item.path.match(CLUSTER_FILES)]
    if misplaced:
        raise pytest.UsageError(f"SLURM tests belong in tests/{CLUSTER_FILES} (they share one pytest-xdist worker): "
                                + ", ".join(misplaced))
    missing = [name for name in LONGEST_FILES if not (REPO_ROOT / "tests" / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONGEST_FILES names no such test file: {', '.join(missing)}")

    def start_rank(item) -> int:  # the cluster's files first, then the longest; the rest in file order
        if item.path.match(CLUSTER_FILES):
            return 0
        return 1 + (LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES else len(LONGEST_FILES))

    items.sort(key=start_rank)  # stable: a file's tests keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` (what launch/test.sh runs), with every tests/test_slurm*.py file as one unit: a file's tests
    stay on one worker, so its module fixtures (reference runs) are built once, and the SLURM tests run one after
    another, so their jobs never queue behind each other's on the 2-node cluster. Units start in the order
    pytest_collection_modifyitems sorts them: that unit, the longest, first (it mostly waits on SLURM while the other
    workers compute), then the longest files."""
    if config.getvalue("dist") != "loadfile":
        return None
    config.option.loadscopereorder = False  # units in collection order, so the SLURM unit first
    from xdist.scheduler import LoadFileScheduling

    class ClusterFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = super()._split_scope(nodeid)
            return CLUSTER_FILES if Path(file).match(CLUSTER_FILES) else file

    return ClusterFilesTogether(config, log)
