"""The training loop: a Trainer built from its stateful parts, then epochs of steps, validation, and the save.

Reads top to bottom: `Trainer.__init__` sets up processes, data, model, optimizer, schedule and resumes them;
`run` is the epoch loop; `train_epoch` the step loop; `validate` the end of an epoch; `finish` the final weights and
the summary (`report_complete` instead, for a finished run run again).
Every concern (data plan, checkpoints, schedules, metrics, tracking, preemption) lives in its own module. The
command line around it is csi_dist.train.
"""
from __future__ import annotations

import logging
import math
import platform
import time
from pathlib import Path
from typing import Callable, NoReturn

import torch
from tqdm import tqdm

from csi_dist import PROCESS_START
from csi_dist.cluster.preemption import PreemptionWatcher
from csi_dist.core.config import Config, save_config
from csi_dist.data.quality import check_bad_samples
from csi_dist.data.shards.reader import LoaderSettings, ShardError, build_loader, open_split
from csi_dist.core.distributed import build_accelerator, configure_logging
from csi_dist.core.domain import metric_direction, monitored_metric
from csi_dist.evaluation.inference import StopRequested, device_batches, predict_split
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.core.faults import limit_gpu_memory, nonfinite_input_values, nonfinite_loss_factors
from csi_dist.core.files import atomic_write_json
from csi_dist.model.loss import WeightedCSILoss
from csi_dist.model.factory import INPUT_CHANNELS, build_model, model_input_size, uses_channels_last
from csi_dist.core.provenance import ProvenanceRecord, config_changes, new_segment, run_origin
from csi_dist.core.run_dir import RunDir
from csi_dist.core.strategy_registry import hide_from_accelerate, resolve_strategy
from csi_dist.training.accumulation import BufferSnapshot, accumulation_windows, batch_plan
from csi_dist.training.checkpoint_files import latest_checkpoint, load_weights, save_weights
from csi_dist.training.checkpointer import Checkpointer, TrainingProgress, saved_trainer_state
from csi_dist.training.compilation import compile_with_run_cache
from csi_dist.training.early_stopping import EarlyStopping
from csi_dist.training.log_window import LogWindow
from csi_dist.training.micro_batch import fit_micro_batch, forward_backward_fits
from csi_dist.training.profiling import StepProfiler
from csi_dist.training.resume_or_start import finished_because, outcome_lines, start_run_directory
from csi_dist.training.schedules import LearningRateSchedule, build_optimizer
from csi_dist.training.step import StepFaults, UpdateLedger, train_step
from csi_dist.training.strategies import build_strategy, describe, skips_on_device
from csi_dist.training.tracking import Tracker

log = logging.getLogger("csi_dist.train")


class TooManyBadSteps(RuntimeError):
    """More non-finite losses than `training.max_bad_steps`."""


def all_ranks_sum(accelerator, count: int) -> int:
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum").item())


def train(config: Config, run_dir: Path, resume: str,
          epoch_end_hook: Callable[[dict, object], bool] | None = None) -> int:
    """Train from `config` into `run_dir`; returns the exit status.

    `epoch_end_hook(record, accelerator)` runs on every rank after each evaluation with that epoch's history
    record (val metrics prefixed "val_": on rank 0; the other ranks get val_loss); returning True stops training
    there (e.g. a pruned sweep trial). The hook must return the same answer on every rank (decide on rank 0 and
    broadcast).
    """
    return Trainer(config, run_dir, resume).run(epoch_end_hook)


class Trainer:
    def __init__(self, config: Config, run_dir: Path, resume: str):
        self.config, self.run_dir = config, run_dir
        # --- processes, logging, run directory -------------------------------------------------------------
        strategy_name = resolve_strategy(config.training.strategy)
        hide_from_accelerate()
        self.accelerator = accelerator = build_accelerator(config.training)
        configure_logging(accelerator)
        # the batch this world size runs (with training.global_batch_size, micro-batch and accumulation follow it);
        # the config stays as asked: a requeue onto another world size derives its own plan from it
        self.plan = plan = batch_plan(config.training, accelerator.num_processes)
        if accelerator.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # this run's peak, also for a second train() in a process
            limit_gpu_memory(accelerator.device)  # a test's forced out-of-memory (csi_dist/core/faults.py)
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes
        resume = start_run_directory(run_dir, resume, accelerator)  # one run per directory (resume_or_start.py)
        checkpoint_path = None if resume == "never" else (latest_checkpoint(run_dir) if resume == "auto"
                                                           else Path(resume))
        saved_state = None if checkpoint_path is None else saved_trainer_state(checkpoint_path)
        # what this command changes of the run's config, named key by key before resolved_config.ini is replaced
        self.config_changes = config_changes(RunDir(run_dir).resolved_config, config) \
            if checkpoint_path is not None and accelerator.is_main_process else None
        self.finished_state = saved_state
        self.finished = saved_state and finished_because(
            run_dir, saved_state, config.training.n_epochs, config.training.max_steps,
            config.callbacks.early_stopping_patience)
        if self.finished:  # a finished run stays finished (a requeue, a sweep, a rerun): run() says so, nothing more
            return
        if self.config_changes:
            log.warning("the config differs from the one this run was trained with (%s, now replaced): %s",
                        RunDir(run_dir).resolved_config, ", ".join(self.config_changes))
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, RunDir(run_dir).resolved_config)

        # --- data ------------------------------------------------------------------------------------------
        self.image_size = image_size = model_input_size(config.model, config.data.image_size)
        self.train_set = open_split(config.data.shard_dir, "train")
        self.val_set = open_split(config.data.shard_dir, "val")
        if self.train_set.num_samples == 0:
            raise ShardError(f"{config.data.shard_dir}: the train split is empty")
        self.validates = self.val_set.num_samples > 0  # nothing to judge on: no early stopping, plateau or best
        if not self.validates:
            log.warning("%s: the val split is EMPTY: no validation metrics, no best weights, no early stopping or "
                        "ReduceLROnPlateau; the run trains all %d epochs%s blind", config.data.shard_dir,
                        config.training.n_epochs, f" (or training.max_steps = {config.training.max_steps} steps, "
                        f"whichever ends first)" if config.training.max_steps else "")

        # --- model, the micro-batch the GPU holds, strategy, loss, optimizer, schedule ------------------------
        torch.manual_seed(config.training.seed)  # identical initial weights on every rank
        model = build_model(config.model, image_size)
        strategy = build_strategy(strategy_name, accelerator, config.training, config.optimization.grad_clip_norm)
        self.channels_last = uses_channels_last(config.model) and strategy.keeps_parameter_layout
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if config.training.global_batch_size and accelerator.device.type == "cuda":  # the micro-batch the GPU holds
            if strategy.shards_parameters():
                log.info("micro-batch %d is not checked against GPU memory: the check runs the whole model on one "
                         "GPU, which %s shards", plan.micro_batch, strategy.name)
            else:
                model = model.to(accelerator.device)
                probe = forward_backward_fits(model, (INPUT_CHANNELS, image_size, image_size), accelerator.device,
                                              accelerator.autocast, self.channels_last)
                self.plan = plan = fit_micro_batch(plan, config.training.global_batch_size, accelerator, probe)
        self.strategy = strategy
        log.info("run %s: %d process(es) on %s, %s, mixed precision %s; %s", run_dir, self.world_size,
                 accelerator.device, strategy.name, strategy.precision, plan)
        self.train_settings = LoaderSettings.from_config(config, image_size, train=True, device=accelerator.device,
                                                         batch_size=plan.micro_batch)
        self.val_settings = LoaderSettings.from_config(config, image_size, train=False, device=accelerator.device,
                                                       batch_size=plan.micro_batch)
        self.steps_per_epoch = math.ceil(self.train_set.num_samples / plan.images_per_micro_step)  # every rank
        updates_per_epoch = math.ceil(self.steps_per_epoch / plan.accumulation)
        self.criterion = WeightedCSILoss(config.loss.unknown_weight).to(accelerator.device)
        mode = metric_direction(config.callbacks.monitor)
        self.monitored_key = monitored_metric(config.callbacks.monitor)
        model, self.optimizer = strategy.prepare(model, plan, lambda wrapped: build_optimizer(
            wrapped, config.optimization, fused=self.uses_fused_optimizer()))
        self.sharding = strategy.sharding(model)  # what really runs: logged, and recorded in every segment
        log.info("%s", describe(self.sharding))
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        log.info("optimizer %s%s", type(optimizer).__name__, ", fused: a non-finite update is skipped on the device, "
                 "its outcome read one update later" if skips_on_device(optimizer) else "")
        self.schedule = LearningRateSchedule(self.optimizer, config.optimization, steps_per_epoch=updates_per_epoch,
                                             n_epochs=config.training.n_epochs, monitor_mode=mode)
        if config.model.compile:
            model = compile_with_run_cache(model, run_dir)
        self.model = model
        self.early_stopping = EarlyStopping(mode, config.callbacks.early_stopping_patience,
                                            config.callbacks.early_stopping_min_delta)
        torch.manual_seed(config.training.seed + 1 + self.rank)  # dropout streams differ per rank, reproducibly

        # --- the stateful parts, resumed together ----------------------------------------------------------
        self.progress = TrainingProgress(self.world_size)
        self.checkpointer = Checkpointer(run_dir, accelerator, strategy, model, self.optimizer,
                                         progress=self.progress, schedule=self.schedule,
                                         early_stopping=self.early_stopping,
                                         keep_last=config.callbacks.keep_last_checkpoints)
        if checkpoint_path is not None:
            self.checkpointer.restore(checkpoint_path)
        if accelerator.is_main_process:  # what this run is made of, and this segment of it
            self.checkpointer.provenance = self.record_provenance()

        self.tracker = Tracker(accelerator, run_dir, config, run_dir.name)
        self.watcher = PreemptionWatcher(run_dir, check_every_steps=config.callbacks.preemption_check_every_steps)
        self.watcher.install()
        self.startup_logged = False  # the first step of this process, whether the run starts or resumes
        self.loss_faults = nonfinite_loss_factors(self.rank)  # {} unless a test injects faults (core/faults.py)
        self.max_steps = config.training.max_steps or math.inf
        self.profiler = StepProfiler(run_dir, config.training.profile_steps, accelerator.is_main_process)

    # --- epochs --------------------------------------------------------------------------------------------------
    def run(self, epoch_end_hook: Callable[[dict, object], bool] | None = None) -> int:
        if self.finished:
            return self.report_complete()
        config, progress = self.config, self.progress
        stop_reason = "completed"
        while progress.epoch < config.training.n_epochs and progress.global_step < self.max_steps:
            epoch = progress.epoch
            epoch_failures = self.train_epoch()
            epoch_finished = progress.epoch_position >= self.train_set.num_samples
            if epoch_finished and (epoch + 1) % config.training.eval_every_epochs and \
                    epoch + 1 < config.training.n_epochs:
                self.schedule.after_epoch()  # training.eval_every_epochs: this epoch ends without a validation
                progress.next_epoch()
                if progress.epoch % config.callbacks.checkpoint_every_epochs == 0:
                    self.checkpointer.save()
                continue
            record = self.validate(epoch, epoch_failures, epoch_finished)
            if epoch_finished:
                progress.next_epoch()
            if epoch_end_hook is not None and epoch_end_hook(record, self.accelerator):
                stop_reason = "stopped by the epoch-end hook (pruned)"
                break
            if self.early_stopping.should_stop:
                stop_reason = f"early stopping: no improvement of {config.callbacks.monitor} in " \
                              f"{self.early_stopping.patience} evaluations"
                break
            if progress.epoch % config.callbacks.checkpoint_every_epochs == 0 or \
                    progress.global_step >= self.max_steps:
                self.checkpointer.save()
        return self.finish(stop_reason)

    def train_epoch(self) -> int:
        """The steps of one epoch (from where a resume left it); returns its decode failures over all ranks."""
        config, progress, accelerator, strategy = self.config, self.progress, self.accelerator, self.strategy
        epoch = progress.epoch
        loader = build_loader(self.train_set, self.train_settings, epoch=epoch, rank=self.rank,
                              world_size=self.world_size, start_position=progress.epoch_position,
                              pin_memory=accelerator.device.type == "cuda")
        step_in_epoch = progress.epoch_position // self.plan.images_per_micro_step  # steps already taken (resume)
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}", unit="batch",
                   disable=not accelerator.is_main_process, dynamic_ncols=True, mininterval=2.0)
        window_log = LogWindow(accelerator, lambda failures: check_bad_samples(
            "train", failures, self.train_set.num_samples, config.data.max_bad_fraction, config.data.shard_dir),
            advice=self.data_advice(), host_advice=self.host_advice())
        batches = window_log.timed(device_batches(loader, accelerator.device, self.channels_last))
        input_faults = nonfinite_input_values(self.rank)  # {} unless a test injects faults (csi_dist/core/faults.py)
        buffers = BufferSnapshot(self.model)  # a skipped update leaves BatchNorm's statistics as they were
        # an update's outcome is read one update later (no host sync per step where the optimizer skips on the GPU)
        updates = UpdateLedger(on_stepped=self.schedule.after_optimizer_step,
                               on_skipped=lambda step: self.count_bad_step(epoch, step))

        def settle_updates() -> None:
            window_log.add_device_wait(updates.settle())  # blocked until the GPU reached the update: a device wait

        def after_micro_batch(batch, images, loss, device_wait_seconds: float) -> None:
            nonlocal step_in_epoch
            window_log.add_micro_batch(loss, batch, images)
            window_log.add_device_wait(device_wait_seconds)
            progress.epoch_position += self.plan.images_per_micro_step
            step_in_epoch += 1
            bar.update(1)

        for window in accumulation_windows(batches, self.plan.accumulation):
            faults = StepFaults(input_faults.get(progress.global_step), self.loss_faults.get(progress.global_step))
            update = train_step(self.model, window, criterion=self.criterion, strategy=strategy,
                                optimizer=self.optimizer, accelerator=accelerator, buffers=buffers, faults=faults,
                                after_micro_batch=after_micro_batch, before_update=settle_updates)
            updates.record(update, step_in_epoch - 1)
            window_log.add_update()
            self.profiler.step()
            progress.global_step += 1
            if not self.startup_logged:  # the startup cost users wait for, after a requeue too (csi_dist.bench)
                self.tracker.log({"train/seconds_to_first_step": time.perf_counter() - PROCESS_START},
                                 progress.global_step)
                self.startup_logged = True

            if progress.global_step % config.training.log_every_steps == 0:
                settle_updates()
                self.log_lines(window_log.emit(self.optimizer.param_groups[0]["lr"], progress.global_step),
                               epoch, bar)
            if self.watcher.should_stop(progress.global_step, accelerator):
                settle_updates()
                self.log_lines(window_log.flush(), epoch, bar)
                bar.close()
                self.stop_for_notice()
            every = config.callbacks.checkpoint_every_steps
            if every and progress.global_step % every == 0 and progress.epoch_position < self.train_set.num_samples:
                settle_updates()
                checkpoint_start = time.perf_counter()
                self.checkpointer.save()
                window_log.exclude(time.perf_counter() - checkpoint_start)  # images/s counts training only
            if progress.global_step >= self.max_steps:
                break
        settle_updates()
        self.log_lines(window_log.flush(), epoch, bar)
        bar.close()
        epoch_failures = all_ranks_sum(accelerator, window_log.epoch_decode_failures)
        check_bad_samples("train", epoch_failures, self.train_set.num_samples, config.data.max_bad_fraction,
                          config.data.shard_dir)
        return epoch_failures

    def log_lines(self, lines: list, epoch: int, bar) -> None:
        """The log windows whose numbers reached the host: to the trackers, the progress bar and, when the window
        was data- or host-bound, the log (LogWindow)."""
        for line in lines:
            self.tracker.log(line.values, line.step)
            if line.message:
                log.warning("epoch %d, optimizer step %d: %s", epoch, line.step, line.message)
            bar.set_postfix(loss=f"{line.values['train/loss']:.4f}",
                            img_s=f"{line.values['train/images_per_second']:.0f}")

    def data_advice(self) -> str:
        """What would feed this run's step faster, for the data-bound message."""
        ways = [f"raise data.num_workers (now {self.config.data.num_workers})"]
        if not self.train_settings.finish_on_device and self.accelerator.device.type == "cuda":
            ways.append("set data.gpu_augment = auto or true (normalise and augment on the GPU)")
        if self.train_set.image_format != "npy":
            ways.append("write the shards with --image-format npy (nothing to decode)")
        return ", or ".join(ways)

    def uses_fused_optimizer(self) -> bool:
        """optimization.fused_optimizer: auto on a GPU; never where the strategy reshapes the parameters."""
        choice = self.config.optimization.fused_optimizer.lower()
        wanted = choice == "true" or (choice == "auto" and self.accelerator.device.type == "cuda")
        return wanted and self.strategy.keeps_parameter_layout

    def host_advice(self) -> str:
        """What would take work off the host, for the host-bound message."""
        ways = [] if self.config.model.compile else ["set model.compile = true (fewer, larger kernels to launch)"]
        ways += [f"a larger training.batch_size (now {self.plan.micro_batch}: fewer launches per image)",
                 "training.profile_steps = 20 shows where the host's time goes"]
        return ", or ".join(ways)

    def count_bad_step(self, epoch: int, step_in_epoch: int) -> None:
        """An update skipped for a non-finite loss or gradient: counted, and the run stops past the bound."""
        progress, max_bad = self.progress, self.config.training.max_bad_steps
        progress.bad_steps += 1
        log.warning("non-finite loss/gradients at epoch %d step %d: step skipped (%d of at most %d)",
                    epoch, step_in_epoch, progress.bad_steps, max_bad)
        if progress.bad_steps > max_bad:
            raise TooManyBadSteps(f"{progress.bad_steps} non-finite steps (training.max_bad_steps={max_bad}); "
                                  f"lower the learning rate or check data")

    # --- end of an epoch: evaluate, schedule, early stopping, best weights, history ------------------------------
    def validate(self, epoch: int, epoch_failures: int, epoch_finished: bool) -> dict:
        """The val split's loss and metrics; returns the epoch's history record (also written to the run)."""
        config, progress, accelerator = self.config, self.progress, self.accelerator
        record = {"epoch": epoch, "global_step": progress.global_step, "lr": self.optimizer.param_groups[0]["lr"]}
        self.strategy.synchronize_buffers(self.model)
        val_loader = build_loader(self.val_set, self.val_settings, epoch=0, rank=self.rank,
                                  world_size=self.world_size, pin_memory=accelerator.device.type == "cuda")
        try:
            predictions = predict_split(self.model, val_loader, self.criterion, accelerator, self.channels_last,
                                        should_stop=lambda batches: self.watcher.should_stop(batches, accelerator))
        except StopRequested:  # a notice during validation: save the trained epoch; a resume validates it
            self.stop_for_notice()
        metrics = {}  # on rank 0 alone: every rank holds the same gathered split, and only rank 0 writes and logs
        if predictions.file_ids and accelerator.is_main_process:
            metrics = compute_metrics(predictions.zone_probs, predictions.zone_targets, predictions.csi_truth,
                                      predictions.ahf_truth)
        check_bad_samples("val", predictions.decode_failures, self.val_set.num_samples, config.data.max_bad_fraction,
                          config.data.shard_dir)
        record.update({"train_decode_failures": epoch_failures,
                       "val_loss": predictions.loss, "val_decode_failures": predictions.decode_failures,
                       **{f"val_{key}": value for key, value in metrics.items() if "/" not in key}})
        monitored = predictions.loss if self.monitored_key == "loss" else \
            self.from_main_process(metrics.get(self.monitored_key, math.nan))
        if self.validates:  # an empty val split judges nothing: no plateau, no early stopping, no best weights
            self.schedule.after_evaluation(monitored)
        if epoch_finished:
            self.schedule.after_epoch()
        improved = self.validates and self.early_stopping.update(monitored, epoch)
        if improved or config.heatmap.every_epoch:
            weights = self.strategy.full_state_dict(self.model)  # a collective under FSDP2/ZeRO-3
            if improved and accelerator.is_main_process:  # published with the checkpoint that records it
                self.checkpointer.stage_best_weights(weights)
            if config.heatmap.every_epoch and accelerator.is_main_process:
                self.draw_heatmaps(weights, RunDir(self.run_dir).epoch_heatmaps(epoch))
        progress.history.append(record)
        self.tracker.log({f"val/{key}": value for key, value in metrics.items()} | {"val/loss": predictions.loss},
                         progress.global_step)
        log.info("epoch %d: val_loss %.4f, f1_weighted %.4f, f1_macro %.4f, csi_mae %.3f%s", epoch,
                 predictions.loss, metrics.get("f1_weighted", math.nan), metrics.get("f1_macro", math.nan),
                 metrics.get("csi_mae", math.nan), " (best)" if improved else "")
        if accelerator.is_main_process:
            atomic_write_json(RunDir(self.run_dir).history, progress.history)
        return record

    def from_main_process(self, value: float) -> float:
        """Rank 0's value on every rank (a collective), for decisions all ranks take alike."""
        shared = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        if self.world_size > 1:
            torch.distributed.broadcast(shared, src=0)
        return float(shared.item())

    def draw_heatmaps(self, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        """heatmap.*: the zone maps of the split's first val images, drawn by this rank alone on an unsharded copy of
        the model holding `weights` (a full state dict), whatever the strategy."""
        from csi_dist.evaluation.heatmaps import heatmaps_for_batches  # captum and matplotlib: only when asked
        if self.val_set.num_samples == 0:
            log.warning("heatmap.enabled: the val split is empty, no heatmaps drawn")
            return
        model = build_model(self.config.model, self.image_size)
        model.load_state_dict(weights)
        device = self.accelerator.device
        loader = build_loader(self.val_set, self.val_settings, epoch=0, rank=0, world_size=1)
        drawn = heatmaps_for_batches(model.to(device), loader, self.config.heatmap.images, out_dir, device,
                                     self.config.heatmap.color_map)
        log.info("zone heatmaps of %d val image(s) in %s", len(drawn), out_dir)

    def record_provenance(self) -> ProvenanceRecord:
        device = self.accelerator.device
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                         platform.machine())
        origin = run_origin(self.config.data.shard_dir, RunDir(self.run_dir).resolved_config, self.config.training.seed)
        record = ProvenanceRecord(self.run_dir, origin, new_segment(self.world_size, [device_name],
                                                                    self.progress.global_step,
                                                                    self.sharding))
        for change in record.changes:
            if change.startswith("config_sha256:") and self.config_changes is not None:
                continue  # named key by key at the start
            log.warning("this run was first trained with something else: %s (%s keeps both)", change,
                        RunDir(self.run_dir).provenance.name)
        return record

    def stop_for_notice(self) -> NoReturn:
        """A preemption notice every rank agreed on: one checkpoint, then requeue and exit (EXIT_PREEMPTED)."""
        self.checkpointer.save()
        if self.checkpointer.provenance is not None:
            self.checkpointer.provenance.update(self.progress.global_step, outcome="stopped by a preemption notice")
        self.tracker.close(status="KILLED")  # until the requeued segment continues the same MLflow run
        # not "the same command": with --resume never it is refused, with --resume fresh it would move this run aside
        self.watcher.finish_after_checkpoint(self.accelerator,
                                             rerun="rerun the command with --resume auto (the default)")

    # --- final weights: the last state, then the best one restored for whoever continues with this model -------
    def finish(self, stop_reason: str) -> int:
        config, progress, accelerator = self.config, self.progress, self.accelerator
        if progress.global_step and progress.bad_steps >= progress.global_step:
            raise TooManyBadSteps(f"every one of the {progress.global_step} optimizer steps had a non-finite loss or "
                                  f"gradient and was skipped: the model learned nothing (check the learning rate, "
                                  f"loss.unknown_weight and the data)")
        self.profiler.close()
        self.checkpointer.save()
        last_weights = self.strategy.full_state_dict(self.model)
        if accelerator.is_main_process:
            save_weights(last_weights, RunDir(self.run_dir).last_weights)
        accelerator.wait_for_everyone()
        best_path = RunDir(self.run_dir).best_weights
        final_weights = last_weights  # complete on rank 0
        if best_path.is_file():
            final_weights = load_weights(best_path)
            self.strategy.load_full_state_dict(self.model, final_weights)
        if config.heatmap.enabled and accelerator.is_main_process:
            self.draw_heatmaps(final_weights, RunDir(self.run_dir).heatmaps)
        if not self.validates:
            stop_reason += " WITHOUT VALIDATION (the val split is empty)"
        if self.early_stopping.best_epoch >= 0:
            best = f"best {config.callbacks.monitor} {self.early_stopping.best_value:.4f} at epoch " \
                   f"{self.early_stopping.best_epoch}"
        else:  # no best weights file: evaluate and predict take weights/last.safetensors
            last = RunDir(self.run_dir).relative(RunDir(self.run_dir).last_weights)
            best = f"no best weights (nothing was validated): {last} is the model" \
                if not self.validates else f"no finite {config.callbacks.monitor}: no best weights"
        if self.checkpointer.provenance is not None:  # the end recorded: a rerun of this run is complete
            self.checkpointer.provenance.update(progress.global_step, outcome=stop_reason, finished=True)
        self.tracker.summary({"stop_reason": stop_reason, "best_epoch": self.early_stopping.best_epoch,
                              f"best_{config.callbacks.monitor}": self.early_stopping.best_value})
        self.tracker.log_run_files()
        self.tracker.close()
        log.info("training finished (%s) after %d optimizer steps; %s", stop_reason, progress.global_step, best)
        if accelerator.is_main_process:
            for line in outcome_lines(self.run_dir):
                log.info("%s", line)
        accelerator.end_training()
        return 0

    def report_complete(self) -> int:
        """A finished run run again: it says so, where its weights are and what to run next, and writes nothing."""
        if self.accelerator.is_main_process:
            state, monitor = self.finished_state, self.config.callbacks.monitor
            stopping = state.get("early_stopping", {})
            best = f"best {monitor} {stopping['best_value']:.4f} at epoch {stopping['best_epoch']}" \
                if stopping.get("best_epoch", -1) >= 0 and stopping.get("best_value") is not None else "no best weights"
            log.info("the run in %s is complete (%s, %d optimizer steps; %s): nothing to train, nothing saved. To "
                     "train it further change what ended it (training.n_epochs, training.max_steps, "
                     "callbacks.early_stopping_patience); to start over: --resume fresh", self.run_dir,
                     self.finished, state.get("global_step", 0), best)
            if self.config_changes:
                log.warning("this command's config differs from the run's (%s), not applied: %s",
                            RunDir(self.run_dir).resolved_config, ", ".join(self.config_changes))
            for line in outcome_lines(self.run_dir):
                log.info("%s", line)
        self.accelerator.end_training()
        return 0
