"""Parallelism strategies: DDP (through Accelerate), FSDP2 (torch `fully_shard`) and DeepSpeed ZeRO.

The strategy comes from the accelerate launch config (`accelerate launch --config_file launch/accelerate/fsdp2.yaml`
exports ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED) or from `training.strategy`. FSDP2 and DeepSpeed are
applied here with torch's and DeepSpeed's own APIs rather than through accelerate's plugins, which silently fall
back to DDP on CPU (so a CPU test could never prove that sharding ran). Checkpoints of DDP and FSDP2 are
torch.distributed.checkpoint (DCP) directories, which load on any world size (resharding); DeepSpeed writes its
own ZeRO checkpoints, which resume on the same world size only (see README, "Strategies").
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from csi_dist.config import Config
from csi_dist.distributed import resolve_mixed_precision

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2", "deepspeed")
_TRUE = ("1", "true", "yes")


def resolve_strategy(config: Config) -> str:
    """The strategy asked for by the launcher's environment, else by the config (auto = DDP)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp2"
    return "ddp" if config.training.strategy == "auto" else config.training.strategy


def hide_from_accelerate() -> None:
    """Stop Accelerator() from applying its own FSDP/DeepSpeed plugin: this module applies the strategy."""
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(name, None)


class DDPStrategy:
    """Data parallel through accelerate; checkpoints through DCP so they reshard like FSDP2's."""

    name = "ddp"
    input_dtype: torch.dtype | None = None  # images stay fp32; autocast picks the compute precision

    def __init__(self, accelerator, config: Config):
        self.accelerator = accelerator
        self.config = config
        self.precision = accelerator.mixed_precision

    def prepare(self, model: nn.Module, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = self.accelerator.prepare_model(model)
        return model, self.accelerator.prepare_optimizer(make_optimizer(model))

    def gradient_sync(self, model: nn.Module, enabled: bool):
        return contextlib.nullcontext() if enabled else self.accelerator.no_sync(model)

    def synchronize_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does before a training forward.

        DDP skips that broadcast after a no-grad forward (FSDP2 and DeepSpeed never do it) and leaves each rank
        with the statistics of its own batches, so evaluation and checkpoints must not rely on it: a DCP checkpoint
        keeps ONE copy of a replicated tensor, written by whichever rank its planner picks. Rank 0's statistics
        depend on rank 0's batches only, so copying them changes nothing a resume has to reproduce.
        """
        broadcast_buffers(model)

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.accelerator.backward(loss / accumulation)

    def step(self, model: nn.Module, optimizer, clip_norm: float, is_update_step: bool) -> bool | None:
        """None on a micro-step; at an update, True if the optimizer stepped, False if the gradients were
        non-finite and the step was skipped. One host sync per update: gradients are already averaged over
        ranks, so every rank takes the same decision without another collective."""
        if not is_update_step:
            return None
        grad_norm = self._clip(model, clip_norm or math.inf)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return finite

    def _clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def save(self, model: nn.Module, optimizer, directory: Path) -> None:
        """Every rank: model and optimizer state as a DCP checkpoint in `directory`."""
        self.synchronize_buffers(model)  # DCP keeps one copy of replicated buffers: make the copies equal
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with _single_process_is_intended():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))

    def load(self, model: nn.Module, optimizer, directory: Path) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The plain (unsharded) weights, on CPU; complete on rank 0 (a collective: call on every rank)."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def describe(self, model: nn.Module) -> str:
        return f"DDP over {self.accelerator.num_processes} process(es)"


class FSDP2Strategy(DDPStrategy):
    """Fully sharded data parallel (FSDP2): parameters, gradients and optimizer state sharded over ranks.

    Parameters stay fp32 and compute runs under Accelerate's bf16 autocast: FSDP2 with bf16 parameters fails on
    BatchNorm networks (running statistics stay fp32), and this keeps one code path for CNNs and ViTs.
    """

    name = "fsdp2"

    def prepare(self, model: nn.Module, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import fully_shard
        model = model.to(self.accelerator.device)
        for block in shard_units(model):
            fully_shard(block)
        fully_shard(model)
        return model, make_optimizer(model)

    def gradient_sync(self, model: nn.Module, enabled: bool):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        (loss / accumulation).backward()

    def _clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def describe(self, model: nn.Module) -> str:
        from torch.distributed.tensor import DTensor
        sharded = sum(isinstance(param, DTensor) for param in model.parameters())
        return f"FSDP2: {sharded} DTensor parameters sharded over {self.accelerator.num_processes} process(es)"


def broadcast_buffers(model: nn.Module) -> None:
    """Copy rank 0's floating-point buffers to every rank."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    for buffer in model.buffers():
        if buffer.is_floating_point():
            torch.distributed.broadcast(buffer, src=0)


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns when there is no process group; a 1-process run is a supported layout, not a mistake."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 wraps one by one: each element of the backbone's stage lists (ResNet layers, DenseNet
    blocks, ViT blocks), or each stage when it is not a list."""
    units = []
    for child in model.backbone.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            units.extend(grandchild for grandchild in child.children() if any(True for _ in grandchild.parameters()))
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


class DeepSpeedStrategy:
    """DeepSpeed ZeRO stage 1, 2 or 3 with DeepSpeed's engine, bf16 and its own checkpoints."""

    name = "deepspeed"

    def __init__(self, accelerator, config: Config):
        self.accelerator = accelerator
        self.config = config
        self.zero_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", config.training.zero_stage))
        self.bf16 = resolve_mixed_precision(config.training.mixed_precision) == "bf16"
        self.precision = "bf16 (DeepSpeed engine)" if self.bf16 else "no"
        self.input_dtype = torch.bfloat16 if self.bf16 else None  # the engine holds bf16 weights
        self.engine = None

    def prepare(self, model: nn.Module, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed
        training = self.config.training
        ds_config = {
            "train_micro_batch_size_per_gpu": training.batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "train_batch_size": training.batch_size * training.gradient_accumulation_steps
            * self.accelerator.num_processes,
            "gradient_clipping": self.config.optimization.grad_clip_norm,
            "zero_optimization": {"stage": self.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        }
        model = model.to(self.accelerator.device)
        optimizer = make_optimizer(model)
        # the engine wraps this optimizer and shares its param_groups: the lr schedule drives it directly
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return self.engine, optimizer

    def gradient_sync(self, model: nn.Module, enabled: bool):
        return contextlib.nullcontext()  # the engine accumulates and reduces at its own boundaries

    def backward(self, loss: torch.Tensor, accumulation: int) -> None:
        self.engine.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self, model: nn.Module, optimizer, clip_norm: float, is_update_step: bool) -> bool | None:
        self.engine.step()
        if not is_update_step:
            return None
        norm = self.engine.get_global_grad_norm()
        return norm is None or math.isfinite(float(norm))

    def synchronize_buffers(self, model: nn.Module) -> None:
        broadcast_buffers(model)

    def save(self, model: nn.Module, optimizer, directory: Path) -> None:
        self.synchronize_buffers(model)
        self.engine.save_checkpoint(str(directory), tag="zero")

    def load(self, model: nn.Module, optimizer, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag="zero")
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {directory}")

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        return {key: value.float().cpu() for key, value in (state or {}).items()}

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.zero_stage == 3:
            raise NotImplementedError("restoring best weights into a ZeRO-3 engine is not supported; "
                                      "evaluate weights/best.safetensors instead")
        self.engine.module.load_state_dict(state)

    def describe(self, model: nn.Module) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage} over {self.accelerator.num_processes} process(es)"


def build_strategy(name: str, accelerator, config: Config):
    return {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}[name](accelerator, config)
