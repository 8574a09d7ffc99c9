"""The training loop: config -> accelerator -> data -> model -> optimizer -> resume -> epochs of steps -> save.

Reads top to bottom; every concern (data plan, checkpoints, schedules, metrics, tracking, preemption) lives in its
own module. The command line around it is csi_dist.train.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from csi_dist import PROCESS_START
from csi_dist.cluster.preemption import PreemptionWatcher
from csi_dist.config import Config, save_config
from csi_dist.data.quality import check_bad_samples
from csi_dist.data.reader import LoaderSettings, ShardError, build_loader, open_split
from csi_dist.distributed import build_accelerator, configure_logging
from csi_dist.domain import metric_direction, monitored_metric
from csi_dist.evaluation.inference import StopRequested, device_batches, predict_split
from csi_dist.evaluation.metrics import compute_metrics
from csi_dist.files import atomic_write_json
from csi_dist.loss import WeightedCSILoss
from csi_dist.models import build_model, model_input_size, uses_channels_last
from csi_dist.training.accumulation import accumulation_windows, window_loss_scale
from csi_dist.training.checkpoint import (latest_checkpoint, load_checkpoint, load_weights, save_checkpoint,
                                          save_weights, set_rng_state)
from csi_dist.training.compilation import compile_with_run_cache
from csi_dist.training.early_stopping import EarlyStopping
from csi_dist.training.faults import nonfinite_loss_factors
from csi_dist.training.schedules import LearningRateSchedule, build_optimizer
from csi_dist.training.strategies import build_strategy, hide_from_accelerate, resolve_strategy
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
    record (val metrics prefixed "val_"); returning True stops training there (e.g. a pruned sweep trial). The
    hook must return the same answer on every rank (decide on rank 0 and broadcast).
    """
    # --- processes, logging, run directory -----------------------------------------------------------------
    strategy_name = resolve_strategy(config)
    hide_from_accelerate()
    accelerator = build_accelerator(config)
    configure_logging(accelerator)
    if strategy_name == "fsdp2" and accelerator.num_processes == 1:
        log.info("FSDP2 on one process shards nothing: training unsharded (FSDP2 checkpoints still load)")
        strategy_name = "ddp"
    strategy = build_strategy(strategy_name, accelerator, config)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak logged is this run's, also for a second train() in a process
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "resolved_config.ini")
    log.info("run %s: %d process(es) on %s, %s, mixed precision %s", run_dir, world_size, accelerator.device,
             strategy_name, strategy.precision)

    # --- data ----------------------------------------------------------------------------------------------
    image_size = model_input_size(config.model, config.data.image_size)
    train_set = open_split(config.data.shard_dir, "train")
    val_set = open_split(config.data.shard_dir, "val")
    train_settings = LoaderSettings.from_config(config, image_size, train=True)
    val_settings = LoaderSettings.from_config(config, image_size, train=False)
    if train_set.num_samples == 0:
        raise ShardError(f"{config.data.shard_dir}: the train split is empty")
    if val_set.num_samples == 0:
        log.warning("%s: the val split is EMPTY: no validation metrics, no best weights, no early stopping or "
                    "ReduceLROnPlateau; the run trains blind for %d epochs", config.data.shard_dir,
                    config.training.n_epochs)
    global_batch = config.training.batch_size * world_size
    steps_per_epoch = math.ceil(train_set.num_samples / global_batch)  # the same on every rank (shard_plan)
    updates_per_epoch = math.ceil(steps_per_epoch / config.training.gradient_accumulation_steps)

    # --- model, loss, optimizer, schedule (identical initial weights on every rank) ------------------------
    torch.manual_seed(config.training.seed)
    model = build_model(config.model, image_size)
    # only DDP keeps parameters as they are: FSDP2 refuses non-contiguous ones and ZeRO flattens them into buffers
    channels_last = uses_channels_last(config.model) and strategy_name == "ddp"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    criterion = WeightedCSILoss(config.loss.unknown_weight).to(accelerator.device)
    mode = metric_direction(config.callbacks.monitor)
    monitored_key = monitored_metric(config.callbacks.monitor)
    model, optimizer = strategy.prepare(model, lambda wrapped: build_optimizer(
        wrapped, config.optimization, fused=accelerator.device.type == "cuda" and strategy_name == "ddp"))
    log.info("%s", strategy.describe(model))
    schedule = LearningRateSchedule(optimizer, config.optimization, steps_per_epoch=updates_per_epoch,
                                    n_epochs=config.training.n_epochs, monitor_mode=mode)
    if config.model.compile:
        model = compile_with_run_cache(model, run_dir)
    early_stopping = EarlyStopping(mode, config.callbacks.early_stopping_patience,
                                   config.callbacks.early_stopping_min_delta)
    torch.manual_seed(config.training.seed + 1 + rank)  # dropout streams differ per rank, reproducibly

    # --- resume ----------------------------------------------------------------------------------------------
    # epoch_position: samples of the epoch's order consumed so far (global, any world size; see shard_plan)
    state = {"epoch": 0, "epoch_position": 0, "global_step": 0, "history": [], "bad_steps": 0,
             "world_size": world_size}
    checkpoint_path = None if resume == "never" else (latest_checkpoint(run_dir) if resume == "auto" else Path(resume))
    if checkpoint_path is not None:
        loaded = load_checkpoint(strategy, checkpoint_path, model, optimizer, rank)
        schedule.load_state_dict(loaded["schedule"])
        saved = loaded["trainer_state"]
        early_stopping.load_state_dict(saved["early_stopping"])
        state.update({key: saved[key] for key in ("epoch", "epoch_position", "global_step", "history", "bad_steps")})
        if loaded["rng"] is not None and saved["world_size"] == world_size:
            set_rng_state(loaded["rng"])  # on another world size the dropout streams start afresh
        log.info("resumed from %s: epoch %d, sample %d of the epoch, %d optimizer steps",
                 checkpoint_path, state["epoch"], state["epoch_position"], state["global_step"])

    tracker = Tracker(run_dir, config, run_dir.name, enabled=accelerator.is_main_process)
    watcher = PreemptionWatcher(run_dir, check_every_steps=config.callbacks.preemption_check_every_steps)
    watcher.install()

    last_saved_step = -1
    startup_logged = False  # the first step of this process, whether the run starts or resumes
    loss_faults = nonfinite_loss_factors(rank)  # {} unless a test injects faults (csi_dist/training/faults.py)

    def checkpoint() -> None:
        nonlocal last_saved_step
        if last_saved_step == state["global_step"]:
            return
        last_saved_step = state["global_step"]
        state["early_stopping"] = early_stopping.state_dict()
        save_checkpoint(accelerator, strategy, run_dir, state["global_step"], model=model, optimizer=optimizer,
                        schedule_state=schedule.state_dict(), trainer_state=state,
                        keep_last=config.callbacks.keep_last_checkpoints)

    # --- epochs ------------------------------------------------------------------------------------------------
    max_steps = config.training.max_steps or math.inf
    accumulation = config.training.gradient_accumulation_steps
    stop_reason = "completed"
    while state["epoch"] < config.training.n_epochs and state["global_step"] < max_steps:
        epoch = state["epoch"]
        loader = build_loader(train_set, train_settings, epoch=epoch, rank=rank, world_size=world_size,
                              start_position=state["epoch_position"], pin_memory=accelerator.device.type == "cuda")
        first_step = state["epoch_position"] // global_batch  # steps of this epoch already taken (resume)
        model.train()
        progress = tqdm(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch}", unit="batch",
                        disable=not accelerator.is_main_process, dynamic_ncols=True, mininterval=2.0)
        log_loss = torch.zeros((), device=accelerator.device)  # sum of the window means since the last log line
        decode_failures = 0  # this rank's undecodable real samples of the epoch (host counts: no GPU sync)
        log_start, log_images, log_updates = time.perf_counter(), 0, 0
        batches = device_batches(loader, accelerator.device, channels_last)
        step_in_epoch = first_step
        for window in accumulation_windows(batches, accumulation):
            loss_scale = window_loss_scale(criterion, window, accelerator)
            for micro_index, (batch, images, zone_targets, sample_mask) in enumerate(window):
                is_update_step = micro_index == len(window) - 1
                with strategy.gradient_sync(model, enabled=is_update_step):
                    with accelerator.autocast():
                        zone_logits = model(images)
                    loss_sum, _ = criterion.weighted_sum(zone_logits, zone_targets, sample_mask)
                    loss = loss_sum * loss_scale  # this micro-batch's share of the window's global mean
                    if state["global_step"] in loss_faults:
                        loss = loss * loss_faults[state["global_step"]]
                    strategy.backward(loss)
                log_loss += loss.detach()
                decode_failures += int((batch["decode_failed"] & ~batch["is_padding"]).sum())
                log_images += images.shape[0]
                state["epoch_position"] += global_batch
                step_in_epoch += 1
                progress.update(1)
                stepped = strategy.step(model, optimizer, config.optimization.grad_clip_norm, is_update_step)
            log_updates += 1
            if stepped:
                schedule.after_optimizer_step()
            else:
                state["bad_steps"] += 1
                log.warning("non-finite loss/gradients at epoch %d step %d: step skipped (%d of at most %d)",
                            epoch, step_in_epoch - 1, state["bad_steps"], config.training.max_bad_steps)
                if state["bad_steps"] > config.training.max_bad_steps:
                    raise TooManyBadSteps(f"{state['bad_steps']} non-finite steps (training.max_bad_steps="
                                          f"{config.training.max_bad_steps}); lower the learning rate or check data")
            state["global_step"] += 1
            if not startup_logged:  # the startup cost users wait for, after a requeue too (read by csi_dist.bench)
                tracker.log({"train/seconds_to_first_step": time.perf_counter() - PROCESS_START}, state["global_step"])
                startup_logged = True

            if state["global_step"] % config.training.log_every_steps == 0:
                # one collective and one host sync per log line: the loss window and the epoch's decode failures
                failures = torch.tensor(float(decode_failures), device=accelerator.device)
                loss_total, failures_total = accelerator.reduce(torch.stack([log_loss, failures]),
                                                                reduction="sum").tolist()
                epoch_failures = int(failures_total)
                check_bad_samples("train", epoch_failures, train_set.num_samples, config.data.max_bad_fraction,
                                  config.data.shard_dir)
                mean_loss = loss_total / world_size / log_updates
                images_per_second = log_images * world_size / (time.perf_counter() - log_start)
                tracker.log({"train/loss": mean_loss, "train/lr": optimizer.param_groups[0]["lr"],
                             "train/images_per_second": images_per_second,
                             "train/decode_failures": epoch_failures,
                             **({"train/peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
                                if accelerator.device.type == "cuda" else {})}, state["global_step"])
                progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{images_per_second:.0f}")
                log_loss.zero_()
                log_start, log_images, log_updates = time.perf_counter(), 0, 0
            if watcher.should_stop(state["global_step"], accelerator):
                checkpoint()
                progress.close()
                tracker.close()
                watcher.finish_after_checkpoint(accelerator)
            every = config.callbacks.checkpoint_every_steps
            if every and state["global_step"] % every == 0 and state["epoch_position"] < train_set.num_samples:
                checkpoint_start = time.perf_counter()
                checkpoint()
                log_start += time.perf_counter() - checkpoint_start  # images/s counts training, not checkpoint writes
            if state["global_step"] >= max_steps:
                break
        progress.close()

        # --- end of epoch: evaluate, schedule, early stopping, best weights, checkpoint ----------------------
        epoch_finished = state["epoch_position"] >= train_set.num_samples
        epoch_failures = all_ranks_sum(accelerator, decode_failures)
        check_bad_samples("train", epoch_failures, train_set.num_samples, config.data.max_bad_fraction,
                          config.data.shard_dir)
        if epoch_finished and (epoch + 1) % config.training.eval_every_epochs and epoch + 1 < config.training.n_epochs:
            schedule.after_epoch()  # training.eval_every_epochs: this epoch ends without a validation
            state["epoch"], state["epoch_position"] = epoch + 1, 0
            if state["epoch"] % config.callbacks.checkpoint_every_epochs == 0:
                checkpoint()
            continue
        record = {"epoch": epoch, "global_step": state["global_step"], "lr": optimizer.param_groups[0]["lr"]}
        strategy.synchronize_buffers(model)
        val_loader = build_loader(val_set, val_settings, epoch=0, rank=rank, world_size=world_size,
                                  pin_memory=accelerator.device.type == "cuda")
        try:
            predictions = predict_split(model, val_loader, criterion, accelerator, channels_last,
                                        should_stop=lambda batches: watcher.should_stop(batches, accelerator))
        except StopRequested:  # a notice during validation: save the trained epoch; a resume validates it
            checkpoint()
            tracker.close()
            watcher.finish_after_checkpoint(accelerator)
        metrics = compute_metrics(predictions.zone_probs, predictions.zone_targets, predictions.csi_truth,
                                  predictions.ahf_truth) if predictions.file_ids else {}
        check_bad_samples("val", predictions.decode_failures, val_set.num_samples, config.data.max_bad_fraction,
                          config.data.shard_dir)
        record.update({"train_decode_failures": epoch_failures,
                       "val_loss": predictions.loss, "val_decode_failures": predictions.decode_failures,
                       **{f"val_{key}": value for key, value in metrics.items() if "/" not in key}})
        monitored = predictions.loss if monitored_key == "loss" else metrics.get(monitored_key, math.nan)
        schedule.after_evaluation(monitored)
        if epoch_finished:
            schedule.after_epoch()
        improved = early_stopping.update(monitored, epoch)
        if improved:
            best_weights = strategy.full_state_dict(model)  # a collective under FSDP2/ZeRO-3
            if accelerator.is_main_process:
                save_weights(best_weights, run_dir / "weights" / "best.safetensors")
        state["history"].append(record)
        tracker.log({f"val/{key}": value for key, value in metrics.items()} | {"val/loss": predictions.loss},
                    state["global_step"])
        log.info("epoch %d: val_loss %.4f, f1_weighted %.4f, f1_macro %.4f, csi_mae %.3f%s", epoch,
                 predictions.loss, metrics.get("f1_weighted", math.nan), metrics.get("f1_macro", math.nan),
                 metrics.get("csi_mae", math.nan), " (best)" if improved else "")
        if accelerator.is_main_process:
            atomic_write_json(run_dir / "training_history.json", state["history"])
        if epoch_finished:
            state["epoch"], state["epoch_position"] = epoch + 1, 0
        if epoch_end_hook is not None and epoch_end_hook(record, accelerator):
            stop_reason = "stopped by the epoch-end hook (pruned)"
            break
        if early_stopping.should_stop:
            stop_reason = f"early stopping: no improvement of {config.callbacks.monitor} in " \
                          f"{early_stopping.patience} evaluations"
            break
        if state["epoch"] % config.callbacks.checkpoint_every_epochs == 0 or state["global_step"] >= max_steps:
            checkpoint()

    # --- final weights: the last state, then the best one restored for whoever continues with this model -------
    if state["global_step"] and state["bad_steps"] >= state["global_step"]:
        raise TooManyBadSteps(f"every one of the {state['global_step']} optimizer steps had a non-finite loss or "
                              f"gradient and was skipped: the model learned nothing (check the learning rate, "
                              f"loss.unknown_weight and the data)")
    checkpoint()
    last_weights = strategy.full_state_dict(model)
    if accelerator.is_main_process:
        save_weights(last_weights, run_dir / "weights" / "last.safetensors")
    accelerator.wait_for_everyone()
    best_path = run_dir / "weights" / "best.safetensors"
    if best_path.is_file():
        strategy.load_full_state_dict(model, load_weights(best_path))
    if val_set.num_samples == 0:
        stop_reason += " WITHOUT VALIDATION (the val split is empty)"
    log.info("training finished (%s) after %d optimizer steps; best %s %.4f at epoch %d", stop_reason,
             state["global_step"], config.callbacks.monitor, early_stopping.best_value, early_stopping.best_epoch)
    tracker.summary({"stop_reason": stop_reason, "best_epoch": early_stopping.best_epoch,
                     f"best_{config.callbacks.monitor}": early_stopping.best_value})
    tracker.close()
    accelerator.end_training()
    return 0
