"""Parallelism strategies: the contract (`Strategy`), DDP (through Accelerate) and FSDP2 (torch `fully_shard`);
DeepSpeed ZeRO in deepspeed_strategy.py; which exist: csi_dist/core/strategy_registry.py.

The strategy comes from the accelerate config the ranks are launched with (`python -m csi_dist.launcher
--config_file launch/accelerate/fsdp2.yaml`, like `accelerate launch`, exports ACCELERATE_USE_FSDP /
ACCELERATE_USE_DEEPSPEED) or from `training.strategy`. FSDP2 and DeepSpeed are
applied here with torch's and DeepSpeed's own APIs rather than through accelerate's plugins, which silently fall
back to DDP on CPU (so a CPU test could never prove that sharding ran). Checkpoints of DDP and FSDP2 are
torch.distributed.checkpoint (DCP) directories, which load on any world size (resharding); DeepSpeed writes its
own ZeRO checkpoints, which resume on another world size through DeepSpeed's universal checkpoint (Adam/AdamW).

One precision policy for every strategy: parameters, gradients and optimizer state in fp32, the forward pass under
bf16 autocast (Accelerate's, where the GPU has bf16). DeepSpeed's own bf16 mode is not used: it casts the module to
bf16, which BatchNorm's fp32 running statistics and channels_last weights cannot follow (every CNN backbone failed
in its first step), and it applies an update before anyone can tell that the gradients were not finite.

Every strategy's backward receives a loss already normalised over the whole accumulation window and all ranks
(train.py), so the gradients of A micro-batches on W ranks add up to the gradient of one batch of A*B*W; the
strategies only sum micro-batches and average ranks, they never divide by the accumulation count again.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from csi_dist.core.config import TrainingConfig
from csi_dist.training.accumulation import BatchPlan
from csi_dist.training.checkpoint_files import read_dcp
from csi_dist.training.step import UpdateOutcome
from csi_dist.core.strategy_registry import DEFAULT, REGISTRY

log = logging.getLogger(__name__)

class Strategy(Protocol):
    """What the trainer, the step (training/step.py) and convert ask of a parallelism strategy; nothing else in the
    package names one. A new strategy is a module with a class like this plus its line in
    csi_dist/core/strategy_registry.py."""

    name: str
    precision: str  # accelerate's mixed precision: "bf16" or "no"
    # capabilities: what the trainer and the docs read instead of the strategy's name
    sharded_checkpoints: bool  # each rank writes its part of a checkpoint (else every rank saves the same tensors)
    resumes_on_any_world_size: bool  # a checkpoint of N processes resumes on M (DeepSpeed: with Adam/AdamW only)
    skips_nonfinite_updates: bool  # a non-finite gradient skips the update before any weight changes
    keeps_parameter_layout: bool  # parameters stay as the model made them: channels_last and fused optimizers apply
    min_processes: int  # below this it would shard nothing: build_strategy runs the default strategy instead

    def __init__(self, accelerator, training: TrainingConfig, grad_clip_norm: float): ...
    def shards_parameters(self) -> bool:
        """Whether a process holds only part of the model (a whole-model probe on one GPU says nothing then)."""
    def prepare(self, model: nn.Module, plan: BatchPlan, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]: ...
    def gradient_sync(self, model: nn.Module, enabled: bool): ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, model: nn.Module, optimizer, is_update_step: bool) -> UpdateOutcome | None: ...
    def save(self, model: nn.Module, optimizer, directory: Path) -> None: ...
    def load(self, model: nn.Module, optimizer, directory: Path) -> None: ...
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]: ...
    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None: ...
    def sharding(self, model: nn.Module) -> dict: ...
    @staticmethod
    def checkpoint_weights(state_dir: Path, template: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
        """The full weights of one of its checkpoints, in one process, for convert (`template()` builds the run's
        model where the format needs one to fill)."""


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips a non-finite update inside its own kernel (torch's fused Adam and AdamW, given
    `found_inf`; their step counts are put back too). Fused SGD also takes the flag, but a skipped FIRST step would
    leave its momentum buffers allocated and never written, so SGD decides on the host."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


class DDPStrategy:
    """Data parallel through accelerate; checkpoints through DCP so they reshard like FSDP2's."""

    name = "ddp"
    sharded_checkpoints, resumes_on_any_world_size, skips_nonfinite_updates = False, True, True
    keeps_parameter_layout, min_processes = True, 1

    def __init__(self, accelerator, training: TrainingConfig, grad_clip_norm: float):
        self.accelerator = accelerator
        self.training = training
        self.grad_clip_norm = grad_clip_norm
        self.precision = accelerator.mixed_precision

    def shards_parameters(self) -> bool:
        return False

    def prepare(self, model: nn.Module, plan: BatchPlan, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
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

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, model: nn.Module, optimizer, is_update_step: bool) -> UpdateOutcome | None:
        """None on a micro-step; at an update its outcome: stepped, or skipped because the gradients were not finite.

        The gradients are already averaged over ranks, so every rank takes the same decision without another
        collective. An optimizer that can skip on the device (skips_on_device) is handed the non-finite flag, as
        torch's GradScaler hands it: no host sync, the host reads the outcome later. Others: one sync per update.
        """
        if not is_update_step:
            return None
        grad_norm = self._clip(model, self.grad_clip_norm or math.inf)
        update = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer inside accelerate's wrapper
        if skips_on_device(update):
            skipped = torch.logical_not(torch.isfinite(grad_norm))
            # read by the fused kernels as GradScaler sets them (a float: 1.0 skips)
            update.grad_scale, update.found_inf = None, skipped.float()
            try:
                optimizer.step()
            finally:
                del update.grad_scale, update.found_inf
            optimizer.zero_grad(set_to_none=True)
            return UpdateOutcome(skipped=skipped)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return UpdateOutcome(stepped=finite)

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
        read_dcp(state, directory)  # weights-only: DCP's own planner would unpickle the non-tensor items
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The plain (unsharded) weights, on CPU; complete on rank 0 (a collective: call on every rank)."""
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def sharding(self, model: nn.Module) -> dict:
        """What really runs, read from the prepared model and the process group (not the config), for each
        provenance segment: the strategy, ZeRO stage, parameters kept as shards and in how many, world size."""
        return live_sharding(self.name, None, model, sharded=0, shards=1)

    @staticmethod
    def checkpoint_weights(state_dir: Path, template: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
        """DCP fills the run's model, resharding as needed (a ViT's position embeddings have the training size)."""
        state = {"model": template().state_dict()}
        read_dcp(state, state_dir)
        return state["model"]


class SingleProcessStrategy(DDPStrategy):
    """One process without accelerate (the Python API's loop, the bench's step on preloaded tensors): DDP's update
    rule (clip, finite check, step or skip) with torch's own backward and clipping."""

    name = "single"

    def __init__(self, grad_clip_norm: float = 0.0):
        self.accelerator, self.training, self.grad_clip_norm, self.precision = None, None, grad_clip_norm, "no"

    def gradient_sync(self, model: nn.Module, enabled: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


class FSDP2Strategy(DDPStrategy):
    """Fully sharded data parallel (FSDP2): parameters, gradients and optimizer state sharded over ranks.

    Parameters stay fp32 and compute runs under Accelerate's bf16 autocast: FSDP2 with bf16 parameters fails on
    BatchNorm networks (running statistics stay fp32), and this keeps one code path for CNNs and ViTs.
    """

    name = "fsdp2"
    sharded_checkpoints, keeps_parameter_layout, min_processes = True, False, 2  # FSDP2 refuses non-contiguous

    def shards_parameters(self) -> bool:
        return True

    def prepare(self, model: nn.Module, plan: BatchPlan, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import fully_shard
        model = model.to(self.accelerator.device)
        for block in shard_units(model):
            fully_shard(block)
        fully_shard(model)
        return model, make_optimizer(model)

    def gradient_sync(self, model: nn.Module, enabled: bool):
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def _clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def sharding(self, model: nn.Module) -> dict:
        from torch.distributed.tensor import DTensor, Shard
        sharded = [param for param in model.parameters() if isinstance(param, DTensor)
                   and any(isinstance(placement, Shard) for placement in param.placements)]
        return live_sharding(self.name, None, model, sharded=len(sharded),
                             shards=max((param.device_mesh.size() for param in sharded), default=1))


def live_sharding(name: str, zero_stage: int | None, model: nn.Module, sharded: int, shards: int, **more) -> dict:
    model = getattr(model, "_orig_mod", model)  # under torch.compile: the prepared model it wraps
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return {"name": name, "zero_stage": zero_stage, "wrapper": type(model).__name__,
            "parameters": sum(1 for _ in model.parameters()), "sharded_parameters": sharded, "shards": shards,
            "world_size": world_size, **more}


def describe(sharding: dict) -> str:
    """The log line of a `sharding()` record."""
    processes = f"over {sharding['world_size']} process(es)"
    if sharding["name"] == "fsdp2":
        return f"FSDP2: {sharding['sharded_parameters']} DTensor parameters sharded {processes}"
    if sharding["name"] == "deepspeed":
        return f"DeepSpeed ZeRO-{sharding['zero_stage']} {processes}"
    return f"DDP {processes}"


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


def build_strategy(name: str, accelerator, training: TrainingConfig, grad_clip_norm: float) -> Strategy:
    """The registered strategy `name` for this run (strategy_registry.py); the default one where `name` needs more
    processes than run (FSDP2 on one process would shard nothing; its checkpoints still load)."""
    chosen = REGISTRY[name].strategy_class()
    if accelerator.num_processes < chosen.min_processes:
        log.info("%s on %d process(es) shards nothing: training with %s (its checkpoints still load)", name,
                 accelerator.num_processes, DEFAULT)
        chosen = REGISTRY[DEFAULT].strategy_class()
    return chosen(accelerator, training, grad_clip_norm)
