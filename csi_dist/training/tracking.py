"""Experiment tracking on rank 0 through accelerate's tracker API: TensorBoard always, W&B, and MLflow on request.

The trackers are accelerate's own (`TensorBoardTracker`, `WandBTracker`, `MLflowTracker`), handed to the
Accelerator (`log_with`, `init_trackers`, `accelerator.log`); what they lack for us is added in small subclasses:
secrets masked, one W&B and one MLflow run per run directory across requeued segments, and a tracking service that
fails (full disk, lost connection, a server down) warned about once and dropped while TensorBoard goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from pathlib import Path

from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

from csi_dist.core.config import Config, config_to_dict
from csi_dist.core.files import atomic_write_json
from csi_dist.core.redaction import masked_argv, redact
from csi_dist.core.run_dir import HISTORY, PROVENANCE, RESOLVED_CONFIG, RunDir

log = logging.getLogger(__name__)

# the run's own records, copied to MLflow when training ends; weights are not: they stay in <run_dir>/weights
# (tens to hundreds of MB per run, a second copy in the local store; the run_dir tag says where they are)
MLFLOW_ARTIFACTS = (RESOLVED_CONFIG, HISTORY, PROVENANCE)


def wandb_config(config: Config) -> dict[str, dict[str, object]]:
    """The config as W&B stores it, with secrets masked like in the saved config and the logs."""
    return {section: {key: redact(value) if isinstance(value, str) else value for key, value in values.items()}
            for section, values in config_to_dict(config).items()}


def mlflow_params(config: Config) -> dict[str, str]:
    """The config as MLflow params, `section.key` = the text resolved_config.ini holds (secrets masked)."""
    return {f"{section}.{key}": redact(str(value))
            for section, values in config_to_dict(config).items() for key, value in values.items()}


class FailSoft:
    """A tracking service that fails must not end a training run: warn once, then stop sending to it."""
    label = ""
    failed = False

    def guarded(self, call) -> None:
        if self.failed:
            return
        try:
            call()
        except Exception as error:  # noqa: BLE001 - any error of the service; TensorBoard keeps logging
            log.warning("%s logging failed (%s: %s); %s is off for the rest of this run, TensorBoard goes on",
                        self.label, type(error).__name__, error, self.label)
            self.failed = True


class WandBRun(FailSoft, WandBTracker):
    """accelerate's W&B tracker with one W&B run per run directory, a masked config and failures survived."""
    label = "W&B"

    def __init__(self, run_dir: Path, config: Config, run_name: str):
        import wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        # one id per run directory: every requeued segment of a run lands in the same W&B run;
        # under `wandb agent` the agent has already chosen the id its sweep expects
        run_id = (os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID")
                  else None) or hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        masked = wandb_config(config)
        # the nested config goes to wandb.init, not to init_trackers: accelerate would hand it to every tracker
        # (TensorBoard would write an hparams folder into tensorboard/, MLflow needs it flat)
        super().__init__(masked["logging"]["wandb_project"], group=masked["logging"]["wandb_group"] or None,
                         name=run_name, id=run_id, resume="allow", mode=config.logging.wandb_mode,
                         dir=str(RunDir(run_dir).wandb.parent), config=masked,  # W&B adds the wandb/
                         settings=wandb.Settings(init_timeout=120, console="off", x_disable_stats=True))

    def start(self) -> None:
        with masked_argv():  # W&B records the command line in the run's metadata
            super().start()  # not guarded: a W&B that cannot start is a configuration error the user sees at once

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        send = super().log
        self.guarded(lambda: send(values, step=step, **kwargs))

    def summary(self, values: dict[str, object]) -> None:
        self.guarded(lambda: self.run.summary.update(values))

    def finish(self, status: str = "FINISHED") -> None:
        self.guarded(super().finish)


class MLflowRun(FailSoft, MLflowTracker):
    """accelerate's MLflow tracker: a local file store under the run directory unless a tracking URI is given, and
    the same MLflow run continued by every segment of the run (its id kept in <run_dir>/mlflow_run.json)."""
    label = "MLflow"

    def __init__(self, run_dir: Path, config: Config, run_name: str):
        self.run_dir = run_dir
        self.configured_uri = config.logging.mlflow_tracking_uri
        self.tracking_uri = self.configured_uri or RunDir(run_dir).mlflow_store.resolve().as_uri()
        tags = {"csi_dist.run_dir": str(run_dir.resolve())}
        if config.logging.wandb_group:
            tags["csi_dist.group"] = redact(config.logging.wandb_group)
        super().__init__(experiment_name=config.logging.wandb_project, run_id=self.recorded_run_id(),
                         tags=tags, run_name=run_name)

    def recorded_run_id(self) -> str | None:
        """The MLflow run an earlier segment of this run started in the same tracking store, if any."""
        path = RunDir(self.run_dir).mlflow_run
        if not path.is_file():
            return None
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable (%s): a new MLflow run starts", path, error)
            return None
        if recorded.get("tracking_uri") != self.configured_uri:
            log.warning("%s names an MLflow run in %r, this segment tracks to %r: a new MLflow run starts there",
                        path, recorded.get("tracking_uri") or "the local store", self.configured_uri or
                        "the local store")
            return None
        return recorded.get("run_id")

    def start(self) -> None:
        import mlflow
        if not self.configured_uri:
            # MLflow 3 keeps its file store in maintenance mode and refuses it unless asked; we ask: a SQLite store
            # costs each new run seconds of schema migrations (12 s measured on a loaded 2-core machine) where the
            # file store costs milliseconds, and plain files travel with the run directory (`mlflow ui
            # --backend-store-uri <run_dir>/mlflow` reads them). A database or server: logging.mlflow_tracking_uri.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(self.tracking_uri)
        begin = super().start

        def start_or_continue() -> None:
            try:
                begin()
            except mlflow.exceptions.MlflowException as error:
                if self.run_id is None:
                    raise
                log.warning("the MLflow run %s named in %s cannot be continued (%s): a new MLflow run starts",
                            self.run_id, RunDir(self.run_dir).mlflow_run, error)
                self.run_id = None
                begin()
            self.run_id = self.active_run.info.run_id
            atomic_write_json(RunDir(self.run_dir).mlflow_run,
                              {"tracking_uri": self.configured_uri, "run_id": self.run_id})
            log.info("MLflow run %s in %s", self.run_id, self.tracking_uri)
        self.guarded(start_or_continue)

    def store_init_configuration(self, values: dict) -> None:
        import mlflow
        store = super().store_init_configuration

        def store_new() -> None:
            # MLflow params are write-once: a continued run logs only those it lacks; a key the resumed command
            # changed keeps its first value here (the start's warning and provenance.json name the change)
            logged = mlflow.get_run(self.run_id).data.params
            new = {key: value for key, value in values.items() if key not in logged}
            if new:
                store(new)
        self.guarded(store_new)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        send = super().log
        self.guarded(lambda: send(values, step=step, **kwargs))

    def summary(self, values: dict[str, object]) -> None:
        import mlflow
        self.guarded(lambda: mlflow.set_tags({f"csi_dist.{key}": str(value) for key, value in values.items()}))

    def log_run_files(self) -> None:
        files = [self.run_dir / name for name in MLFLOW_ARTIFACTS if (self.run_dir / name).is_file()]
        self.guarded(lambda: [self.log_artifact(str(path)) for path in files])

    def finish(self, status: str = "FINISHED") -> None:
        import mlflow
        if not self.failed:
            # accelerate's finish ends every run FINISHED; a preempted segment ends KILLED until its requeue continues it
            self.guarded(lambda: mlflow.end_run(status=status))
            return
        ours = getattr(self, "active_run", None)
        current = mlflow.active_run()
        if ours is not None and current is not None and current.info.run_id == ours.info.run_id:
            # leave no run of ours active in this process (a later training in it could not start its own); MLflow
            # takes it off its stack before it tells the failed store
            with contextlib.suppress(Exception):
                mlflow.end_run(status="FAILED")


class Tracker:
    """Scalars to TensorBoard (`<run_dir>/tensorboard`), W&B (`<run_dir>/wandb`) and MLflow; a no-op on other ranks."""

    def __init__(self, accelerator, run_dir: Path, config: Config, run_name: str):
        self.accelerator = accelerator
        if not accelerator.is_main_process:
            return
        board = RunDir(run_dir).tensorboard  # accelerate's tracker writes <logging_dir>/<run_name>
        trackers = [TensorBoardTracker(board.name, board.parent)]
        if config.logging.wandb_mode != "disabled":
            trackers.append(WandBRun(run_dir, config, run_name))
        if config.logging.mlflow:
            trackers.append(MLflowRun(run_dir, config, run_name))
        # the Accelerator is built before the run directory is known (every rank agrees on it through the
        # Accelerator), so the trackers join it here rather than through Accelerator(log_with=...)
        accelerator.log_with = trackers
        accelerator.init_trackers(config.logging.wandb_project)
        for tracker in self.service(MLflowRun):
            tracker.store_init_configuration(mlflow_params(config))

    def service(self, kind: type) -> list:
        return [tracker for tracker in self.accelerator.trackers if isinstance(tracker, kind)]

    @property
    def wandb_run(self):
        """The live W&B run, None when W&B is off or has failed."""
        return next((tracker.run for tracker in self.service(WandBRun) if not tracker.failed), None)

    def log(self, values: dict[str, float], step: int) -> None:
        finite = {key: float(value) for key, value in values.items()
                  if isinstance(value, (int, float)) and math.isfinite(value)}
        self.accelerator.log(finite, step=step)

    def summary(self, values: dict[str, object]) -> None:
        for tracker in self.service(WandBRun) + self.service(MLflowRun):
            tracker.summary(values)

    def log_run_files(self) -> None:
        """The run's records (config, history, provenance) into its MLflow run, once training has ended."""
        for tracker in self.service(MLflowRun):
            tracker.log_run_files()

    def close(self, status: str = "FINISHED") -> None:
        """Finish every tracker now (status: MLflow's, KILLED for a preempted segment). Not left to
        accelerator.end_training(): a preempted rank exits through the preemption watcher, which never calls it;
        the trackers are then dropped from the Accelerator so that end_training() does not finish them twice."""
        for tracker in self.accelerator.trackers:
            if isinstance(tracker, (WandBRun, MLflowRun)):
                tracker.finish(status)
            else:
                tracker.finish()
        self.accelerator.trackers.clear()
