"""DeepSpeed ZeRO stage 1, 2 or 3 as a csi_dist strategy (strategies.Strategy), with DeepSpeed's own checkpoints.

Its checkpoints are DeepSpeed's (one tag directory, `zero`), vetted weights-only before DeepSpeed or its converters
unpickle them; on another world size they resume through DeepSpeed's universal checkpoint (Adam/AdamW), made once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from csi_dist.core.config import TrainingConfig
from csi_dist.training.accumulation import BatchPlan
from csi_dist.training.checkpoint_files import CheckpointError, check_weights_only, unusable_because
from csi_dist.training.step import UpdateOutcome
from csi_dist.training.strategies import broadcast_buffers, live_sharding

log = logging.getLogger(__name__)


def deepspeed_zero_stage(training: TrainingConfig) -> int:
    """The ZeRO stage: the accelerate config's (its environment) over training.zero_stage."""
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", training.zero_stage))


ZERO_TAG, UNIVERSAL_TAG = "zero", "zero_universal"  # DeepSpeed's checkpoint and its universal form


def check_deepspeed_state(tag_dir: Path) -> None:
    """Refuse a DeepSpeed checkpoint (one tag's directory, or its universal form) any of whose state files holds
    more than tensors, plain data and the three DeepSpeed classes its ZeRO optimizers pickle (fp32, stages 1-3):
    DeepSpeed and its converters unpickle them with weights_only=False."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    check_weights_only(sorted(Path(tag_dir).rglob("*.pt")), (LossScaler, ZeroStageEnum, fragment_address))


def _collectives_through_gloo(deepspeed) -> None:
    """On a CPU, DeepSpeed JIT-compiles a shared-memory all-reduce before its first collective: 45 s of C++ on a
    2-core machine, once per machine, for CPU speed that a debug run does not need (and whose bf16 kernels fault on
    CPUs without AVX-512). Marking it incompatible keeps the collectives on the process group's gloo, as for DDP."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedStrategy:
    """DeepSpeed ZeRO stage 1, 2 or 3 with DeepSpeed's engine and its own checkpoints (fp32 weights, bf16 autocast).

    The trainer owns the accumulation boundary (`gradient_sync`) and the loss scaling, so the engine's micro-step
    counter can never disagree with the trainer about which step updates (a partial window at the end of an epoch,
    a resume). In fp32 the ZeRO optimizers check the global gradient norm and skip a non-finite update themselves,
    before touching the weights.
    """

    name = "deepspeed"
    sharded_checkpoints, resumes_on_any_world_size, skips_nonfinite_updates = True, True, True  # any size: Adam(W)
    keeps_parameter_layout, min_processes = False, 1  # ZeRO flattens parameters into its own buffers

    def __init__(self, accelerator, training: TrainingConfig, grad_clip_norm: float):
        self.accelerator = accelerator
        self.training = training
        self.grad_clip_norm = grad_clip_norm
        self.zero_stage = deepspeed_zero_stage(training)
        self.precision = accelerator.mixed_precision
        self.engine = None

    def shards_parameters(self) -> bool:
        return self.zero_stage == 3

    def prepare(self, model: nn.Module, plan: BatchPlan, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed
        ds_config = {
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.accumulation,
            "train_batch_size": plan.global_batch,
            "gradient_clipping": self.grad_clip_norm,
            "zero_optimization": {"stage": self.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": False},  # fp32 master weights; compute in bf16 under autocast (module docstring)
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        }
        if self.accelerator.device.type == "cpu":
            _collectives_through_gloo(deepspeed)
        model = model.to(self.accelerator.device)
        optimizer = make_optimizer(model)
        # the engine wraps this optimizer and shares its param_groups: the lr schedule drives it directly
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return self.engine, optimizer

    def gradient_sync(self, model: nn.Module, enabled: bool):
        self.engine.set_gradient_accumulation_boundary(enabled)  # the trainer's window, not the engine's counter
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the window

    def step(self, model: nn.Module, optimizer, is_update_step: bool) -> UpdateOutcome | None:
        self.engine.step()  # at a boundary: reduce, check the norm, update or skip; else only counts the micro-step
        if not is_update_step:
            return None
        norm = self.engine.get_global_grad_norm()  # the engine decided on the host already
        return UpdateOutcome(stepped=norm is None or math.isfinite(float(norm)))

    def synchronize_buffers(self, model: nn.Module) -> None:
        broadcast_buffers(model)

    def save(self, model: nn.Module, optimizer, directory: Path) -> None:
        self.synchronize_buffers(model)
        self.engine.save_checkpoint(str(directory), tag=ZERO_TAG)

    def load(self, model: nn.Module, optimizer, directory: Path) -> None:
        """DeepSpeed's own checkpoint on the world size it was saved on; on another one, its universal form (made
        once, by rank 0, with DeepSpeed's converter, kept beside the original) that any world size loads. Every
        rank checks every state file weights-only before DeepSpeed or its converter reads it, so all refuse alike."""
        check_deepspeed_state(Path(directory) / ZERO_TAG)
        saved_ranks = len(list((Path(directory) / ZERO_TAG).glob("*optim_states.pt")))
        tag = ZERO_TAG if saved_ranks == self.accelerator.num_processes else self._universal_checkpoint(
            Path(directory), saved_ranks, optimizer)
        if tag == UNIVERSAL_TAG:  # the converter's output, or a universal checkpoint that came with the checkpoint
            check_deepspeed_state(Path(directory) / UNIVERSAL_TAG)
        self.engine._config.load_universal_checkpoint = tag == UNIVERSAL_TAG  # DeepSpeed reads it while it loads
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def _universal_checkpoint(self, directory: Path, saved_ranks: int, optimizer) -> str:
        universal = directory / UNIVERSAL_TAG
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # what DeepSpeed's converter carries
            raise RuntimeError(f"this ZeRO checkpoint was saved on {saved_ranks} process(es) and DeepSpeed's "
                               f"universal checkpoint, which moves it to {self.accelerator.num_processes}, carries "
                               f"Adam/AdamW state only (this run: {type(optimizer).__name__}): resume it on "
                               f"{saved_ranks} process(es)")
        if self.accelerator.is_main_process and not universal.is_dir():
            log.info("ZeRO checkpoint of %d process(es) resumed on %d: converting it to DeepSpeed's universal "
                     "checkpoint in %s", saved_ranks, self.accelerator.num_processes, universal)
            partial = directory / f"{UNIVERSAL_TAG}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            converted = subprocess.run(  # DeepSpeed's converter; a model that is not Megatron's needs the injection
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(directory / ZERO_TAG), "--output_folder", str(partial), "--inject_missing_state",
                 "--num_extract_workers", "1", "--num_merge_workers", "1"], capture_output=True, text=True)
            if converted.returncode != 0:
                self.accelerator.wait_for_everyone()
                raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {directory / ZERO_TAG} failed: "
                                   f"{(converted.stderr.strip().splitlines() or ['no output'])[-1]}")
            partial.rename(universal)
        self.accelerator.wait_for_everyone()
        if not universal.is_dir():
            raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {directory / ZERO_TAG} failed on "
                               f"rank 0 (its log says why)")
        return UNIVERSAL_TAG

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        return {key: (value.float() if value.is_floating_point() else value).cpu()  # num_batches_tracked: int64
                for key, value in (state or {}).items()}

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Every rank: put `state` into the engine's module; under ZeRO-3 each parameter is gathered, overwritten
        by rank 0 and partitioned again (DeepSpeed's GatheredParameters with a modifier rank)."""
        module = self.engine.module
        if self.zero_stage != 3:
            module.load_state_dict(state)
            return
        import deepspeed
        parameters = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(parameters.values()), modifier_rank=0):
            if self.accelerator.is_main_process:
                with torch.no_grad():
                    for name, parameter in parameters.items():
                        parameter.copy_(state[name])
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                if name in state:
                    buffer.copy_(state[name])

    def sharding(self, model: nn.Module) -> dict:
        """The engine's stage; ZeRO-3's partitioned parameters (`ds_tensor`); the ZeRO optimizer's partitions."""
        partitions = getattr(self.engine.optimizer, "partition_count", 1)  # per param group under ZeRO-1/2
        return live_sharding(self.name, self.engine.zero_optimization_stage(), model,
                             sharded=sum(hasattr(param, "ds_tensor") for param in self.engine.module.parameters()),
                             shards=max(partitions) if isinstance(partitions, list) else partitions,
                             optimizer=type(self.engine.optimizer).__name__)

    @staticmethod
    def checkpoint_weights(state_dir: Path, template: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
        """DeepSpeed's own consolidation of the partitions (no template needed), after the weights-only check:
        zero_to_fp32 unpickles with weights_only=False."""
        check_deepspeed_state(state_dir / ZERO_TAG)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=ZERO_TAG)
        except Exception as error:  # noqa: BLE001 - a damaged or partial ZeRO checkpoint: one line, not a traceback
            raise CheckpointError(unusable_because(error)) from None

