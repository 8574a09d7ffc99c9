"""The warmup-then-main learning-rate schedule against torch's own composition (SequentialLR) and hand-worked values:
where torch can give our learning rates it does (cosine, none), and where it cannot (StepLR, ReduceLROnPlateau) the
difference is shown, which is why schedules.py composes torch's schedulers itself."""
from __future__ import annotations

import pytest
import torch
from torch.optim import lr_scheduler

from csi_dist.core.config import OptimizationConfig
from csi_dist.training.schedules import LearningRateSchedule

STEPS_PER_EPOCH, EPOCHS, PEAK, MIN_LR, START_FACTOR = 7, 6, 0.1, 1e-4, 1e-3


def one_parameter_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)


def our_schedule(optimizer, kind: str, warmup_epochs: float, **extra) -> LearningRateSchedule:
    cfg = OptimizationConfig(scheduler=kind, warmup_epochs=warmup_epochs, learning_rate=PEAK, min_lr=MIN_LR,
                             step_size=2, gamma=0.5, **extra)
    return LearningRateSchedule(optimizer, cfg, steps_per_epoch=STEPS_PER_EPOCH, n_epochs=EPOCHS, monitor_mode="min")


def our_learning_rates(kind: str, warmup_epochs: float, *, resume_after: int | None = None,
                       monitored=lambda epoch: 1.0, **extra) -> list[float]:
    """The learning rate after every optimizer step of a whole run, driven as the trainer drives it (evaluation, then
    the epoch's end). `resume_after`: after that many steps the schedule and optimizer go through their state dicts
    into fresh objects, as a resumed run's do."""
    optimizer = one_parameter_optimizer()
    schedule = our_schedule(optimizer, kind, warmup_epochs, **extra)
    rates, step = [], 0
    for epoch in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            optimizer.step()
            schedule.after_optimizer_step()
            step += 1
            if step == resume_after:
                saved_optimizer, saved_schedule = optimizer.state_dict(), schedule.state_dict()
                optimizer = one_parameter_optimizer()
                schedule = our_schedule(optimizer, kind, warmup_epochs, **extra)
                optimizer.load_state_dict(saved_optimizer)
                schedule.load_state_dict(saved_schedule)
            rates.append(optimizer.param_groups[0]["lr"])
        schedule.after_evaluation(monitored(epoch))
        schedule.after_epoch()
        rates[-1] = optimizer.param_groups[0]["lr"]  # what the next epoch starts with
    return rates


def torch_sequential_learning_rates(main: str, warmup_epochs: float) -> list[float]:
    """torch's composition, stepped once per optimizer step: LinearLR for the warmup, then the main scheduler."""
    optimizer = one_parameter_optimizer()
    warmup_steps = int(round(warmup_epochs * STEPS_PER_EPOCH))
    if main == "cosine":
        after = lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS_PER_EPOCH * EPOCHS - warmup_steps, eta_min=MIN_LR)
    elif main == "steplr":
        after = lr_scheduler.StepLR(optimizer, step_size=2 * STEPS_PER_EPOCH, gamma=0.5)
    else:
        after = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=START_FACTOR, end_factor=1.0, total_iters=warmup_steps)
    sequence = lr_scheduler.SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])
    rates = []
    for _ in range(STEPS_PER_EPOCH * EPOCHS):
        optimizer.step()
        sequence.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


def warmup_factor(step: int, warmup_epochs: float) -> float:
    warmup_steps = int(round(warmup_epochs * STEPS_PER_EPOCH))
    return 1.0 if step >= warmup_steps else START_FACTOR + (1 - START_FACTOR) * step / warmup_steps


# 0.3 epoch: a warmup that ends mid-epoch (2 of 7 steps); 1.5: 10 steps (round half to even), across an epoch's end
@pytest.mark.parametrize("warmup_epochs", [0.0, 0.3, 1.5])
@pytest.mark.parametrize("kind", ["cosine", "none"])
def test_warmup_then_cosine_or_constant_gives_torchs_sequential_learning_rates(kind, warmup_epochs):
    ours = our_learning_rates(kind, warmup_epochs)
    assert ours == pytest.approx(torch_sequential_learning_rates(kind, warmup_epochs), rel=1e-15, abs=0)
    if kind == "cosine":
        assert ours[-1] == pytest.approx(MIN_LR, rel=1e-12)


@pytest.mark.parametrize(("kind", "resume_after"), [("cosine", 3), ("cosine", 25), ("none", 5), ("steplr", 9)],
                         ids=["cosine-mid-warmup", "cosine-mid-cosine", "none-mid-warmup", "steplr-mid-epoch"])
def test_a_schedule_resumed_from_its_state_continues_with_the_same_learning_rates(kind, resume_after):
    uninterrupted = our_learning_rates(kind, 1.5)
    assert our_learning_rates(kind, 1.5, resume_after=resume_after) == uninterrupted  # exactly
    if kind != "steplr":
        assert uninterrupted == pytest.approx(torch_sequential_learning_rates(kind, 1.5), rel=1e-15, abs=0)


def test_the_checkpointed_schedule_state_keeps_the_format_of_existing_runs():
    optimizer = one_parameter_optimizer()
    state = our_schedule(optimizer, "cosine", 1.5).state_dict()
    assert set(state) == {"optimizer_steps", "warmup", "main"}
    assert state["optimizer_steps"] == 0 and state["warmup"]["total_iters"] == 10 and state["main"]["T_max"] == 32


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.3, 1.5])
def test_steplr_decays_on_epochs_counted_from_the_start_of_the_run_which_sequentiallr_cannot_give(warmup_epochs):
    ours = our_learning_rates("steplr", warmup_epochs)
    # hand-worked: the warmup's factor at this step times gamma=0.5 for every 2 whole epochs behind (step_size=2)
    expected = [PEAK * warmup_factor(step, warmup_epochs) * 0.5 ** ((step // STEPS_PER_EPOCH) // 2)
                for step in range(1, STEPS_PER_EPOCH * EPOCHS + 1)]
    assert ours == pytest.approx(expected, rel=1e-12, abs=0)
    torchs = torch_sequential_learning_rates("steplr", warmup_epochs)
    if warmup_epochs == 0:
        assert ours == pytest.approx(torchs, rel=1e-15, abs=0)
    else:  # SequentialLR starts StepLR's count at the warmup's end: each decay comes that much later
        first_decay = 2 * STEPS_PER_EPOCH
        assert ours[first_decay - 1] == pytest.approx(torchs[first_decay - 1] * 0.5, rel=1e-12)


def test_reducelronplateau_halves_after_each_bad_evaluation_which_sequentiallr_refuses():
    # validation loss 1.0, then never better: with patience 0 every later evaluation halves the learning rate,
    # warmup (0.5 epoch = 4 steps) or not
    ours = our_learning_rates("reducelronplateau", 0.5, patience=0, factor=0.5)
    epoch_end_rates = ours[STEPS_PER_EPOCH - 1::STEPS_PER_EPOCH]
    assert epoch_end_rates == pytest.approx([PEAK * 0.5 ** epoch for epoch in range(EPOCHS)], rel=1e-12)
    assert ours[0] == pytest.approx(PEAK * warmup_factor(1, 0.5), rel=1e-12)
    optimizer = one_parameter_optimizer()
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        lr_scheduler.SequentialLR(optimizer, [lr_scheduler.LinearLR(optimizer, total_iters=4),
                                              lr_scheduler.ReduceLROnPlateau(optimizer)], milestones=[4])
