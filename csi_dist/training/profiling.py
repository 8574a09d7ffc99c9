"""training.profile_steps: where the milliseconds of the trainer's steps go, host and GPU, from torch.profiler.

Rank 0 profiles that many optimizer steps after the first WARM_UP_STEPS (compile, cuDNN's choices and the loader's
start-up are not the steady state) and writes into `<run dir>/profile/`: `trace.json` (open it in Perfetto or
chrome://tracing) and `summary.txt`, the operators by GPU time and by host time, per step.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from csi_dist.run_dir import RunDir

log = logging.getLogger(__name__)

WARM_UP_STEPS = 10


class StepProfiler:
    """`step()` after every optimizer step; profiles steps WARM_UP_STEPS+1 .. WARM_UP_STEPS+steps of this process."""

    def __init__(self, run_dir: Path, steps: int, enabled: bool):
        self.run_dir = RunDir(run_dir)
        self.steps = steps
        self.profiler = None
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

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _write(self, profiler: torch.profiler.profile) -> None:
        self.run_dir.profile.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.run_dir.profile_trace))
        averages = profiler.key_averages()
        gpu = "device_time_total" if torch.cuda.is_available() else "cpu_time_total"
        lines = [f"torch.profiler over {self.steps} optimizer step(s) after the first {WARM_UP_STEPS}; times are "
                 f"totals over those steps", "", "By GPU time:" if torch.cuda.is_available() else "By CPU time:",
                 averages.table(sort_by=gpu, row_limit=40), "", "By host (CPU) time of the operator itself:",
                 averages.table(sort_by="self_cpu_time_total", row_limit=40)]
        self.run_dir.profile_summary.write_text("\n".join(lines))
        log.info("profile of %d step(s) written to %s", self.steps, self.run_dir.profile)
