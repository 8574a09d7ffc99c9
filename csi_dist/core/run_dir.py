"""The layout of a run directory, named once: every path a run writes or reads under `<run dir>/`.

`RunDir(root)` answers where each part of a run lives; no other module spells these names (tests/test_run_dir.py
checks both: a real run holds exactly the files named here, and no other module of csi_dist writes one of the names).
Torch-free and importing nothing of csi_dist, so every layer uses it (cluster/, the commands before torch loads).

    <run dir>/resolved_config.ini      the config the run trains with (written at each start)
    <run dir>/provenance.json          where the model came from (csi_dist.core.provenance)
    <run dir>/training_history.json    one record per evaluation
    <run dir>/checkpoints/step-XXXXXXXX/  complete checkpoints (their inside is csi_dist.training.checkpoint_files's)
    <run dir>/weights/best.safetensors, last.safetensors, <stem>.calibration.json (temperatures beside weights)
    <run dir>/tensorboard/, wandb/, mlflow/ + mlflow_run.json   experiment tracking
    <run dir>/heatmaps/                zone heatmaps drawn during training
    <run dir>/evaluation/              evaluate's reports; evaluation/external/<shards>/ for other shards
    <run dir>/export/                  export's model files
    <run dir>/compile_cache/           torch.compile's kernels
    <run dir>/profile/                 training.profile_steps: the profiler's trace and its summary tables
    <run dir>/PREEMPT_REQUESTED        a preemption request (a manual `touch` too)
    <run dir>/failure_requeues/<id>    one file per SLURM requeue after a lost rank
    <run dir>.old-YYYYmmdd-HHMMSS[-N]  a run moved aside by --resume fresh;  <run dir>-debug  a --debug run
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

RESOLVED_CONFIG = "resolved_config.ini"
PROVENANCE = "provenance.json"
HISTORY = "training_history.json"
CHECKPOINTS = "checkpoints"
WEIGHTS = "weights"
WEIGHTS_SUFFIX = ".safetensors"
BEST, LAST = "best", "last"
CALIBRATION_SUFFIX = ".calibration.json"
TENSORBOARD = "tensorboard"
WANDB = "wandb"
MLFLOW_STORE = "mlflow"
MLFLOW_RUN = "mlflow_run.json"
HEATMAPS = "heatmaps"
EVALUATION = "evaluation"
EXTERNAL = "external"
EXPORT = "export"
COMPILE_CACHE = "compile_cache"
PROFILE = "profile"
PREEMPT_REQUEST = "PREEMPT_REQUESTED"
FAILURE_REQUEUES = "failure_requeues"
MOVED_ASIDE = ".old-"
DEBUG_SUFFIX = "-debug"

# what makes a directory hold a run (a folder counts when it is not empty): --resume never refuses such a directory
RUN_CONTENTS = (CHECKPOINTS, WEIGHTS, HISTORY, PROVENANCE)


def calibration_beside(weights_file: Path) -> Path:
    """`<stem>.calibration.json` beside a `<stem>.safetensors` weights file (of a run or not)."""
    weights_file = Path(weights_file)
    return weights_file.with_name(f"{weights_file.stem}{CALIBRATION_SUFFIX}")


def evaluation_provenance(out_dir: Path) -> Path:
    """The provenance.json evaluate writes beside its reports (which weights, which shards)."""
    return Path(out_dir) / PROVENANCE


def evaluation_heatmaps(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / HEATMAPS / split


def external_evaluations(out_dir: Path) -> Path:
    """Where evaluate puts the evaluations of other shards: `<out_dir>/external/<shard folder name>/`."""
    return Path(out_dir) / EXTERNAL


def default_run_dir(output_dir: str, run_name: str, model_arch: str) -> Path:
    """Where a run lives when none is named: <logging.output_dir>/<logging.run_name>, the name being
    <date>_<time>_<model> when logging.run_name is empty (the trainer's command line and the Python API)."""
    return Path(output_dir) / (run_name or f"{datetime.now():%Y%m%d_%H%M%S}_{model_arch}")


@dataclass(frozen=True)
class RunDir:
    """The paths of the run in `root` (nothing is read or created: a path may not exist yet)."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def resolved_config(self) -> Path:
        return self.root / RESOLVED_CONFIG

    @property
    def provenance(self) -> Path:
        return self.root / PROVENANCE

    @property
    def history(self) -> Path:
        return self.root / HISTORY

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def weights_dir(self) -> Path:
        return self.root / WEIGHTS

    def weights(self, stem: str) -> Path:
        """`weights/<stem>.safetensors` ("best", "last")."""
        return self.weights_dir / f"{stem}{WEIGHTS_SUFFIX}"

    @property
    def best_weights(self) -> Path:
        return self.weights(BEST)

    @property
    def last_weights(self) -> Path:
        return self.weights(LAST)

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD

    @property
    def wandb(self) -> Path:
        """W&B's offline files (wandb.init(dir=root) writes them here)."""
        return self.root / WANDB

    @property
    def mlflow_store(self) -> Path:
        """The local MLflow file store when logging.mlflow_tracking_uri is empty."""
        return self.root / MLFLOW_STORE

    @property
    def mlflow_run(self) -> Path:
        """The MLflow run this run directory continues: {"tracking_uri", "run_id"}."""
        return self.root / MLFLOW_RUN

    @property
    def heatmaps(self) -> Path:
        return self.root / HEATMAPS

    def epoch_heatmaps(self, epoch: int) -> Path:
        return self.heatmaps / f"epoch_{epoch:03d}"

    @property
    def evaluation(self) -> Path:
        return self.root / EVALUATION

    def external_evaluation(self, shard_dir: str | Path) -> Path:
        """evaluation/external/<shard folder name>: an evaluation on shards the run was not trained on."""
        return external_evaluations(self.evaluation) / Path(shard_dir).resolve().name

    @property
    def export(self) -> Path:
        """export's model files (ONNX, TorchScript) and their sidecars."""
        return self.root / EXPORT

    @property
    def compile_cache(self) -> Path:
        return self.root / COMPILE_CACHE

    @property
    def profile(self) -> Path:
        return self.root / PROFILE

    @property
    def profile_trace(self) -> Path:
        return self.profile / "trace.json"

    @property
    def profile_summary(self) -> Path:
        return self.profile / "summary.txt"

    @property
    def preempt_request(self) -> Path:
        return self.root / PREEMPT_REQUEST

    @property
    def failure_requeues(self) -> Path:
        return self.root / FAILURE_REQUEUES

    @property
    def debug(self) -> RunDir:
        """Where `train --debug` trains instead (never the real run)."""
        return RunDir(self.root.with_name(f"{self.root.name}{DEBUG_SUFFIX}"))

    def moved_aside(self, now: datetime, number: int = 1) -> Path:
        """The dated sibling `--resume fresh` moves the run to: <name>.old-YYYYmmdd-HHMMSS, then -2, -3, ..."""
        base = f"{self.root.name}{MOVED_ASIDE}{now:%Y%m%d-%H%M%S}"
        return self.root.with_name(base if number == 1 else f"{base}-{number}")

    def relative(self, path: Path) -> str:
        """`path` as the run directory's users read it (e.g. 'weights/best.safetensors')."""
        return Path(path).relative_to(self.root).as_posix()
