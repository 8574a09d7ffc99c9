"""The training step without a host sync: an optimizer that skips on the device (fused AdamW, given the non-finite
flag) must leave weights, optimizer state and BatchNorm buffers exactly as a skip decided on the host does."""
from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from csi_dist.model.loss import WeightedCSILoss
from csi_dist.training.accumulation import BufferSnapshot
from csi_dist.training.step import SingleProcess, StepFaults, UpdateLedger, UpdateOutcome, train_step
from csi_dist.training.strategies import SingleProcessStrategy, skips_on_device


def tiny_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 30),
                               torch.nn.Unflatten(1, (6, 5)))


def micro_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 1, 12, 12, generator=generator)
    targets = torch.randint(0, 5, (4, 6), generator=generator)
    return None, images, targets, torch.ones(4, dtype=torch.bool)


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{name}": tensor.clone() for name, tensor in model.state_dict().items()}
    for index, param_state in enumerate(optimizer.state.values()):
        state |= {f"optimizer.{index}.{name}": tensor.clone() for name, tensor in param_state.items()}
    return state


def run_steps(fused: bool, faults: list[StepFaults]) -> tuple[list[dict], list[UpdateOutcome]]:
    model = tiny_bn_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused, foreach=None if fused else False)
    strategy, buffers = SingleProcessStrategy(grad_clip_norm=1.0), BufferSnapshot(model)
    states, outcomes = [state_of(model, optimizer)], []
    for step, step_faults in enumerate(faults):
        outcomes.append(train_step(model, [micro_batch(step)], criterion=WeightedCSILoss(), strategy=strategy,
                                   optimizer=optimizer, accelerator=SingleProcess(torch.device("cpu")),
                                   buffers=buffers, faults=step_faults))
        states.append(state_of(model, optimizer))
    return states, outcomes


@pytest.mark.parametrize("fault", [StepFaults(image_value=math.nan), StepFaults(loss_factor=math.inf)],
                         ids=["nan image (BatchNorm statistics turn NaN)", "inf loss"])
def test_an_update_skipped_on_the_device_leaves_everything_as_a_host_skip_does(fault):
    faults = [StepFaults(), fault, StepFaults()]
    on_device, device_outcomes = run_steps(True, faults)
    on_host, host_outcomes = run_steps(False, faults)
    assert all(outcome.skipped is not None for outcome in device_outcomes)  # the sync-free path really ran
    assert all(outcome.skipped is None for outcome in host_outcomes)
    assert [outcome.stepped() for outcome in device_outcomes] == [True, False, True]
    assert [outcome.stepped() for outcome in host_outcomes] == [True, False, True]
    # the skipped update changed nothing: weights, Adam's moments and step count, BatchNorm statistics and count
    before, after = on_device[1], on_device[2]
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == []
    assert float(after["optimizer.0.step"]) == 1.0 and float(on_device[3]["optimizer.0.step"]) == 2.0
    # and the two ways of skipping end in the same model (fused and single-tensor AdamW: rounding apart)
    for name in on_host[3]:
        torch.testing.assert_close(on_device[3][name], on_host[3][name], rtol=1e-5, atol=1e-6, msg=name)


class SlowStepStrategy(SingleProcessStrategy):
    """Its step takes 50 ms of the host's time; its outcome on the device (launched, not waited for) or on the host."""

    def __init__(self, outcome_on_device: bool):
        super().__init__()
        self.outcome_on_device = outcome_on_device

    def step(self, model, optimizer, is_update_step):
        time.sleep(0.05)
        return UpdateOutcome(skipped=torch.tensor(False)) if self.outcome_on_device else UpdateOutcome(stepped=True)


@pytest.mark.parametrize("outcome_on_device", [True, False], ids=["decided on the device", "decided on the host"])
def test_only_a_step_decided_on_the_host_counts_as_waiting_for_the_gpu(outcome_on_device):
    # the "waits on GPU" share of the log: a step that left its outcome on the device only launched work (host
    # time); one that decided on the host had to wait for the GPU's gradients
    model, waits = tiny_bn_model(), []
    train_step(model, [micro_batch(0)], criterion=WeightedCSILoss(), strategy=SlowStepStrategy(outcome_on_device),
               optimizer=torch.optim.AdamW(model.parameters()), accelerator=SingleProcess(torch.device("cpu")),
               buffers=BufferSnapshot(model), after_micro_batch=lambda *args: waits.append(args[-1]))
    assert waits == [0.0] if outcome_on_device else waits[0] >= 0.05


def test_only_fused_adam_and_adamw_skip_on_the_device():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    assert skips_on_device(torch.optim.AdamW(parameters, fused=True))
    assert skips_on_device(torch.optim.Adam(parameters, fused=True))
    assert not skips_on_device(torch.optim.AdamW(parameters))
    assert not skips_on_device(torch.optim.SGD(parameters, lr=0.1, momentum=0.9, fused=True))


def test_buffers_are_put_back_where_the_flag_says_even_over_nan():
    model = tiny_bn_model()
    buffers = BufferSnapshot(model)
    saved = copy.deepcopy({name: buffer for name, buffer in model.named_buffers()})
    buffers.take()
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.fill_(math.nan if buffer.is_floating_point() else 7)
    buffers.restore_where(torch.tensor(False))  # kept: the update stepped
    assert all(torch.isnan(buffer).all() for buffer in model.buffers() if buffer.is_floating_point())
    buffers.restore_where(torch.tensor(True))  # put back: the update was skipped
    assert all(torch.equal(buffer, saved[name]) for name, buffer in model.named_buffers())


def test_the_ledger_reads_an_outcome_once_and_says_where_a_skip_was():
    events = []
    ledger = UpdateLedger(on_stepped=lambda: events.append("stepped"),
                          on_skipped=lambda where: events.append(f"skipped at {where}"))
    assert ledger.settle() == 0.0
    ledger.record(UpdateOutcome(skipped=torch.tensor(False)), 0)
    ledger.record(UpdateOutcome(skipped=torch.tensor(True)), 1)  # settles the one before
    assert events == ["stepped"]
    ledger.settle()
    ledger.settle()
    assert events == ["stepped", "skipped at 1"]


def test_a_host_that_never_waits_for_the_gpu_is_called_host_bound_and_told_what_to_do():
    from csi_dist.training.log_window import data_bound_message, host_bound_message
    advice = "set model.compile = true"
    assert host_bound_message(wait_share=0.02, device_share=0.01, advice=advice) == (
        "host-bound: the host waited on the GPU only 1% of the time and on the loader 2%: the GPU waits for the "
        "host to launch its work: set model.compile = true")
    assert host_bound_message(wait_share=0.02, device_share=0.40, advice=advice) is None  # the GPU is the limit
    assert host_bound_message(wait_share=0.30, device_share=0.01, advice=advice) is None  # data-bound instead
    assert data_bound_message(0.30, 100.0, 400.0, "raise data.num_workers").startswith("data-bound")


def test_the_profiler_writes_a_trace_and_the_operators_of_the_profiled_steps_only(tmp_path):
    import json

    from csi_dist.core.run_dir import RunDir
    from csi_dist.training.profiling import WARM_UP_STEPS, StepProfiler, profiled_steps
    seen = []

    class Recording(StepProfiler):  # keeps the real profiler's events for the check below
        def _write(self, torch_profiler):
            seen.append(torch_profiler.events())
            super()._write(torch_profiler)
    profiler = Recording(tmp_path, steps=2, enabled=True)
    matrix = torch.randn(64, 64)
    for step in range(WARM_UP_STEPS + 2):
        operation = torch.mm if step < WARM_UP_STEPS else torch.bmm  # only the last two steps run bmm
        matrix = operation(matrix, matrix) if step < WARM_UP_STEPS else operation(matrix[None], matrix[None])[0]
        matrix = matrix / matrix.norm()
        profiler.step()
    profiler.close()
    summary = RunDir(tmp_path).profile_summary.read_text()
    assert "over 2 optimizer step(s) after the first 10" in summary
    assert "aten::bmm" in summary and "aten::mm " not in summary
    assert json.loads(RunDir(tmp_path).profile_trace.read_text())["traceEvents"]
    assert len(profiled_steps(seen[0])) == 2  # the idle report finds the real profiler's steps by their name
    assert profiler.profiler is None  # stopped once its window is written: the steps after it run unprofiled
    assert not StepProfiler(tmp_path / "other", steps=2, enabled=False).run_dir.profile.exists()


def test_the_idle_report_finds_the_gpus_gaps_and_what_the_host_did_in_them():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from csi_dist.training.profiling import gpu_idle_report

    def event(name, start, end, device=DeviceType.CPU, children=()):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), device_type=device,
                               thread=1, cpu_children=list(children))
    # two steps of 20 ms; kernels busy 0-10, 12-20, 30-40 ms (in microseconds); between them the host was in a
    # memcpy (10-11 ms), in Python (11-12), and waiting for the loader for 10 ms (20-30)
    events = [event("ProfilerStep*", 0, 20_000), event("ProfilerStep*", 20_000, 40_000),
              event("kernel", 0, 10_000, DeviceType.CUDA), event("kernel", 12_000, 20_000, DeviceType.CUDA),
              event("kernel", 30_000, 40_000, DeviceType.CUDA), event("cudaMemcpyAsync", 10_000, 11_000),
              event("enumerate(DataLoader)", 20_000, 30_000)]
    lines = gpu_idle_report(events, steps=2)
    assert lines[0].startswith("GPU idle: 6.00 ms of 20.00 ms per step (30.0%)")
    assert lines[1:] == ["     5.000 ms per step  enumerate(DataLoader)",
                         "     0.500 ms per step  cudaMemcpyAsync",
                         "     0.500 ms per step  (Python, outside any torch operator)"]
