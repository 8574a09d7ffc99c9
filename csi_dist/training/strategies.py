"""Parallelism strategies: DDP (through Accelerate), FSDP2 (torch `fully_shard`) and DeepSpeed ZeRO.

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
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from csi_dist.config import TrainingConfig
from csi_dist.training.checkpoint import check_weights_only, read_dcp

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp2", "deepspeed")
_TRUE = ("1", "true", "yes")


def resolve_strategy(training: TrainingConfig) -> str:
    """The strategy asked for by the launcher's environment, else by the config (auto = DDP)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp2"
    return "ddp" if training.strategy == "auto" else training.strategy


def deepspeed_zero_stage(training: TrainingConfig) -> int:
    """The ZeRO stage: the accelerate config's (its environment) over training.zero_stage."""
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", training.zero_stage))


def shards_parameters(strategy_name: str, training: TrainingConfig) -> bool:
    """FSDP2 and ZeRO-3 keep a shard of the model on each GPU, not the whole of it."""
    return strategy_name == "fsdp2" or (strategy_name == "deepspeed" and deepspeed_zero_stage(training) == 3)


def hide_from_accelerate() -> None:
    """Stop Accelerator() from applying its own FSDP/DeepSpeed plugin: this module applies the strategy."""
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        os.environ.pop(name, None)


class DDPStrategy:
    """Data parallel through accelerate; checkpoints through DCP so they reshard like FSDP2's."""

    name = "ddp"

    def __init__(self, accelerator, training: TrainingConfig, grad_clip_norm: float):
        self.accelerator = accelerator
        self.training = training
        self.grad_clip_norm = grad_clip_norm
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

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, model: nn.Module, optimizer, is_update_step: bool) -> bool | None:
        """None on a micro-step; at an update, True if the optimizer stepped, False if the gradients were
        non-finite and the step was skipped. One host sync per update: gradients are already averaged over
        ranks, so every rank takes the same decision without another collective."""
        if not is_update_step:
            return None
        grad_norm = self._clip(model, self.grad_clip_norm or math.inf)
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

    def __init__(self, accelerator, training: TrainingConfig, grad_clip_norm: float):
        self.accelerator = accelerator
        self.training = training
        self.grad_clip_norm = grad_clip_norm
        self.zero_stage = deepspeed_zero_stage(training)
        self.precision = accelerator.mixed_precision
        self.engine = None

    def prepare(self, model: nn.Module, make_optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        import deepspeed
        training = self.training
        ds_config = {
            "train_micro_batch_size_per_gpu": training.batch_size,
            "gradient_accumulation_steps": training.gradient_accumulation_steps,
            "train_batch_size": training.batch_size * training.gradient_accumulation_steps
            * self.accelerator.num_processes,
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

    def step(self, model: nn.Module, optimizer, is_update_step: bool) -> bool | None:
        self.engine.step()  # at a boundary: reduce, check the norm, update or skip; else only counts the micro-step
        if not is_update_step:
            return None
        norm = self.engine.get_global_grad_norm()
        return norm is None or math.isfinite(float(norm))

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


def build_strategy(name: str, accelerator, training: TrainingConfig, grad_clip_norm: float):
    strategy = {"ddp": DDPStrategy, "fsdp2": FSDP2Strategy, "deepspeed": DeepSpeedStrategy}[name]
    return strategy(accelerator, training, grad_clip_norm)
