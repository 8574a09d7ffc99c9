"""training.profile_steps: where the milliseconds of the trainer's steps go, host and GPU, from torch.profiler.

Rank 0 profiles that many optimizer steps after the first WARM_UP_STEPS (compile, cuDNN's choices and the loader's
start-up are not the steady state) and writes into `<run dir>/profile/`: `trace.json` (open it in Perfetto or
chrome://tracing) and `summary.txt`: how long the GPU sat idle per step and what the host was doing meanwhile, then
the operators by GPU time and by host time.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.autograd import DeviceType

from csi_dist.core.run_dir import RunDir

log = logging.getLogger(__name__)

WARM_UP_STEPS = 10
STEP_EVENT = "ProfilerStep"  # the profiler's own span of each step: "ProfilerStep#N", listed as "ProfilerStep*"


class StepProfiler:
    """`step()` after every optimizer step; profiles steps WARM_UP_STEPS+1 .. WARM_UP_STEPS+steps of this process."""

    def __init__(self, run_dir: Path, steps: int, enabled: bool):
        self.run_dir = RunDir(run_dir)
        self.steps = steps
        self.profiler, self.taken = None, 0
        if enabled and steps > 0:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, schedule=torch.profiler.schedule(wait=WARM_UP_STEPS - 1, warmup=1,
                                                                        active=steps, repeat=1),
                on_trace_ready=self._write)
            self.profiler.start()

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()
            self.taken += 1
            if self.taken >= WARM_UP_STEPS + self.steps:  # the window is written: stop profiling the steps after it
                self.close()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _write(self, profiler: torch.profiler.profile) -> None:
        self.run_dir.profile.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.run_dir.profile_trace))
        averages = profiler.key_averages()
        gpu = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
        lines = [f"torch.profiler over {self.steps} optimizer step(s) after the first {WARM_UP_STEPS}; times in the "
                 f"tables are totals over those steps", "", *gpu_idle_report(profiler.events(), self.steps), "",
                 "By GPU time:" if torch.cuda.is_available() else "By CPU time:",
                 averages.table(sort_by=gpu, row_limit=40), "", "By host (CPU) time of the operator itself:",
                 averages.table(sort_by="self_cpu_time_total", row_limit=40)]
        self.run_dir.profile_summary.write_text("\n".join(lines))
        log.info("profile of %d step(s) written to %s", self.steps, self.run_dir.profile)


def profiled_steps(events) -> list:
    """The host-side spans of the profiled steps, one per step."""
    return [event for event in events if event.name.startswith(STEP_EVENT) and event.device_type == DeviceType.CPU]


def gpu_idle_report(events, steps: int) -> list[str]:
    """How long the GPU sat idle during the profiled steps (no kernel or copy running on any stream) and what the
    host's main thread was doing meanwhile: its innermost torch operator or CUDA call, or Python outside any."""
    kernels = sorted((event.time_range.start, event.time_range.end) for event in events
                     if event.device_type != DeviceType.CPU)
    step_events = profiled_steps(events)
    if not kernels or not step_events:
        return []
    begin = min(event.time_range.start for event in step_events)
    end = max(event.time_range.end for event in step_events)
    gaps, busy_until = [], begin
    for start, stop in kernels:
        if busy_until < start <= end:
            gaps.append((busy_until, start))
        busy_until = max(busy_until, stop)
    if busy_until < end:
        gaps.append((busy_until, end))
    main_thread = step_events[0].thread  # innermost events of one thread follow each other: one sweep finds them
    leaves = sorted((event for event in events if event.device_type == DeviceType.CPU
                     and event.thread == main_thread and not event.cpu_children
                     and not event.name.startswith(STEP_EVENT)), key=lambda event: event.time_range.start)
    outside = "(Python, outside any torch operator)"
    by_activity: dict[str, float] = {}
    first = 0
    for start, stop in gaps:
        while first < len(leaves) and leaves[first].time_range.end <= start:
            first += 1
        covered, index = 0.0, first
        while index < len(leaves) and leaves[index].time_range.start < stop:
            overlap = min(stop, leaves[index].time_range.end) - max(start, leaves[index].time_range.start)
            if overlap > 0:
                by_activity[leaves[index].name] = by_activity.get(leaves[index].name, 0.0) + overlap
                covered += overlap
            index += 1
        by_activity[outside] = by_activity.get(outside, 0.0) + max(stop - start - covered, 0.0)
    idle, wall = sum(stop - start for start, stop in gaps), end - begin
    lines = [f"GPU idle: {idle / 1000 / steps:.2f} ms of {wall / 1000 / steps:.2f} ms per step ({idle / wall:.1%}); "
             f"the host's main thread meanwhile:"]
    for name, micros in sorted(by_activity.items(), key=lambda item: -item[1])[:15]:
        lines.append(f"  {micros / 1000 / steps:8.3f} ms per step  {name}")
    return lines
