"""Checkpoint directories on disk, written atomically, listed and read back safely: model, optimizer, schedule, trainer
state and every rank's RNG streams.

A checkpoint is a directory `<run_dir>/checkpoints/step-XXXXXXXX/` holding `state/` (model and optimizer, written by
the parallelism strategy: a torch.distributed.checkpoint directory for DDP/FSDP2, DeepSpeed's own for ZeRO),
`schedule.pt`, `trainer_state.json` (strict JSON), one `rng_rankNNNNN.pt` per rank and, once an evaluation has
chosen one, `best.safetensors` (the best weights its early-stopping state names; see save_checkpoint). It is written
under a `.partial` name by all ranks together and renamed by rank 0 only once every file is fsynced, so a directory
with the final name is always complete; the newest such directory is the one `--resume auto` takes (the directory
listing is the single source of truth). A checkpoint is removed by renaming it away first, so a kill never leaves
half of one under a final name. Nothing is unpickled beyond plain data: our own files load with
`torch.load(weights_only=True)` or safetensors, DCP's pickled `.metadata` with an unpickler that only builds DCP's
own metadata classes, DCP's non-tensor items (optimizer param_groups) with a load planner that reads them
weights-only, and every DeepSpeed state file is read weights-only before DeepSpeed opens it: a crafted checkpoint is
refused, naming the file, never executed.
"""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from csi_dist.core.files import atomic_path, fsync_path, strict_json_value
from csi_dist.core.run_dir import RunDir
from csi_dist.core.strategy_registry import STRATEGY_STATE_DIR
from csi_dist.core.weights import CheckpointError, load_weights, save_weights  # noqa: F401 - this module's too

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
DELETING_SUFFIX = ".deleting"
# A complete checkpoint moved aside while a new save of the same step takes its name; it counts as complete until
# that new one has its final name (a kill between the two renames must not leave zero complete checkpoints).
REPLACED_SUFFIX = ".replaced"
DCP_METADATA_FILE = ".metadata"
SCHEDULE_FILE = "schedule.pt"
STATE_FILE = "trainer_state.json"
BEST_WEIGHTS_FILE = "best.safetensors"  # in a checkpoint, and published as <run_dir>/weights/best.safetensors


def rng_state() -> dict:
    """This process's random streams in a weights_only-loadable form (tensors, ints, lists)."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                       "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
             "python": {"version": python_state[0], "state": list(python_state[1]),
                        "gauss_next": python_state[2]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_root(run_dir: Path) -> Path:
    return RunDir(run_dir).checkpoints


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and (
        CHECKPOINT_PATTERN.match(path.name) or _is_orphan_replaced(path))]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name.removesuffix(REPLACED_SUFFIX))[1]))


def _is_orphan_replaced(path: Path) -> bool:
    """A checkpoint moved aside for a new save of its step that never got its name: still the complete one."""
    name = path.name.removesuffix(REPLACED_SUFFIX)
    return (path.name.endswith(REPLACED_SUFFIX) and CHECKPOINT_PATTERN.match(name) is not None
            and not (path.parent / name).exists())


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fsync_path(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        fsync_path(path)


def _remove_checkpoint(path: Path) -> None:
    """Rename out of the `step-XXXXXXXX` namespace first: a kill during the rmtree leaves only debris."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def best_weights_path(run_dir: Path) -> Path:
    return RunDir(run_dir).best_weights


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights on disk; files are only ever replaced, never changed in place),
    or a copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def publish_best_weights(checkpoint: Path, run_dir: Path) -> None:
    """`<run_dir>/weights/best.safetensors` := the best weights `checkpoint` holds, atomically; removed when it holds
    none (its state has chosen no best yet, or the val split is empty), so the file never names another state's best.
    """
    source, target = Path(checkpoint) / BEST_WEIGHTS_FILE, best_weights_path(run_dir)
    if source.is_file():
        with atomic_path(target) as temporary:
            _link_or_copy(source, temporary)
    elif target.exists():
        target.unlink()
        fsync_path(target.parent)


def save_checkpoint(accelerator, strategy, run_dir: Path, global_step: int, *, model, optimizer,
                    schedule_state: dict, trainer_state: dict, keep_last: int,
                    best_weights: Path | None = None) -> Path:
    """Called on every rank at the same step. Returns the final directory.

    `best_weights` (rank 0): the safetensors file of the best weights `trainer_state`'s early stopping names, or None
    when none is chosen. Best weights are part of the checkpoint's atomic unit: the file is linked into the checkpoint
    before its rename, and `weights/best.safetensors` is published from the renamed checkpoint only after it. The
    alternative, writing weights/best.safetensors when an evaluation improves (as before), leaves it ahead of the
    newest checkpoint until the next save: a kill in between, or a resume from an older checkpoint, gave a resumed run
    whose restored best value described other weights than the file. Now the newest complete checkpoint is the
    single source of truth for the best weights too: a kill between the rename and the publication leaves
    weights/best.safetensors one checkpoint behind, and the resume publishes it again from the checkpoint it restores
    (Checkpointer.restore). The cost is a link per checkpoint, and a copy only where hard links are missing.
    """
    root = checkpoint_root(run_dir)
    final = root / f"step-{global_step:08d}"
    partial = root / f"step-{global_step:08d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a save that was killed
        for debris in root.glob(f"step-*{DELETING_SUFFIX}"):  # of a removal that was killed
            shutil.rmtree(debris, ignore_errors=True)
        for replaced in root.glob(f"step-*{REPLACED_SUFFIX}"):  # of a replacement that was killed
            if not _is_orphan_replaced(replaced):
                shutil.rmtree(replaced, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    strategy.save(model, optimizer, partial / STRATEGY_STATE_DIR)
    rank_file = partial / f"rng_rank{accelerator.process_index:05d}.pt"
    torch.save(rng_state(), rank_file)
    fsync_path(rank_file)
    if accelerator.is_main_process:
        torch.save(schedule_state, partial / SCHEDULE_FILE)
        # strict JSON: an undefined value (a best value before any finite evaluation) is null, never a bare NaN
        (partial / STATE_FILE).write_text(json.dumps(strict_json_value(trainer_state), indent=2, allow_nan=False))
        if best_weights is not None:
            _link_or_copy(best_weights, partial / BEST_WEIGHTS_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(partial)
        fsync_path(partial)
        replaced = final.with_name(final.name + REPLACED_SUFFIX)
        if final.exists():  # the same step saved twice (e.g. a run resumed from its final checkpoint)
            shutil.rmtree(replaced, ignore_errors=True)
            final.rename(replaced)  # still complete, and found as such, until the new one has the name
        partial.rename(final)
        fsync_path(root)
        publish_best_weights(final, run_dir)  # after the rename: never ahead of a complete checkpoint
        shutil.rmtree(replaced, ignore_errors=True)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            _remove_checkpoint(old)
        log.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata objects and nothing else (torch's FileSystemReader would unpickle anything)."""

    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
               ("torch", "Size"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as dcp_metadata
        found = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        if isinstance(found, type) and found.__module__ == module:  # its own classes, not what it imports (os)
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def check_dcp_metadata(state_dir: Path) -> None:
    """Refuse a DCP directory whose pickled `.metadata` would build anything but DCP metadata."""
    path = Path(state_dir) / DCP_METADATA_FILE
    if not path.is_file():
        return
    try:
        with open(path, "rb") as handle:
            _DCPMetadataUnpickler(handle).load()
    except Exception as error:  # noqa: BLE001 - a crafted or damaged file: nothing of it may be used
        raise CheckpointError(f"{path} is not a plain DCP metadata file, refused: {type(error).__name__}: "
                              f"{error}") from None


def _weights_only_refusal(error: Exception) -> str:
    """The line of torch's weights-only error that says what was refused (the rest is advice about weights_only)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(
        ("Weights only load failed", "Check the documentation", "Please file an issue"))]
    return (specific or lines or [type(error).__name__])[0]


def check_weights_only(files: Iterable[Path], allowed_globals: Iterable = ()) -> None:
    """Refuse the first of `files` that `torch.load(weights_only=True)` cannot read, before anything that unpickles
    with weights_only=False (DeepSpeed) opens it. `allowed_globals` are the classes the files may hold besides
    tensors and plain data. Memory-mapped: the tensors are not read, only the pickle is checked."""
    for file in files:
        try:
            with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed_globals)):
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the refusal says it all
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # noqa: BLE001 - a crafted or damaged file: nothing of it may be used
            raise CheckpointError(f"{file} holds more than tensors and plain data, refused: "
                                  f"{_weights_only_refusal(error)}") from None


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that each non-tensor item (optimizer param_groups, any value that is not
    a tensor) is read with `torch.load(weights_only=True)`: torch's own (2.11-2.14) reads it with weights_only=False,
    so a pickle in a data file would run, whatever `.metadata` says."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            plain = torch.load(value, weights_only=True)
        except Exception as error:  # noqa: BLE001 - a crafted or damaged item: nothing of it may be used
            raise CheckpointError(f"{self._data_file(read_item)} holds {read_item.dest_index.fqn} as more than "
                                  f"plain data, refused: {_weights_only_refusal(error)}") from None
        # torch's own placement into the state dict, given a pickle of the plain data just read (made here)
        checked = io.BytesIO()
        torch.save(plain, checked)
        checked.seek(0)
        super().load_bytes(read_item, checked)

    def _data_file(self, read_item) -> Path:
        storage = getattr(self.metadata, "storage_data", None) or {}
        where = storage.get(read_item.storage_index)
        return self.directory / where.relative_path if hasattr(where, "relative_path") else self.directory


def read_dcp(state: dict, directory: Path) -> None:
    """Fill `state` in place from the DCP checkpoint in `directory` (every rank, or one process alone), unpickling
    nothing but DCP's metadata and plain data; a refused item raises CheckpointError naming its data file."""
    check_dcp_metadata(directory)
    try:
        with warnings.catch_warnings():  # one process alone is a supported layout (convert, 1-process runs)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, checkpoint_id=str(directory), planner=WeightsOnlyLoadPlanner(directory))
    except CheckpointException as error:  # DCP gathers every rank's failure: ours is raised as it is
        refused = [failure[0] for failure in error.failures.values() if isinstance(failure[0], CheckpointError)]
        if refused:
            raise refused[0] from None
        raise CheckpointError(unusable_because(error)) from None


def unusable_because(error: BaseException) -> str:
    """One line on why a checkpoint could not be loaded, with the likely fix for another architecture's."""
    # DCP's message carries each rank's whole traceback: its last line is the reason
    reason = str(error).strip().splitlines()[-1] if isinstance(error, CheckpointException) else \
        f"{type(error).__name__}: {error}"
    hint = " (written for another model: check model.model_arch)" if re.search(
        r"Missing key|Unexpected key|[Ss]ize mismatch", reason) else ""
    return reason + hint


def load_checkpoint(strategy, path: Path, model, optimizer, process_index: int) -> dict:
    """Restore model and optimizer in place (every rank); return schedule, trainer state and this rank's RNG."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete csi_dist checkpoint (no {STATE_FILE})")
    check_dcp_metadata(path / STRATEGY_STATE_DIR)
    try:
        strategy.load(model, optimizer, path / STRATEGY_STATE_DIR)
        loaded = {
            "schedule": torch.load(path / SCHEDULE_FILE, map_location="cpu", weights_only=True),
            "trainer_state": json.loads((path / STATE_FILE).read_text()),
        }
        rank_file = path / f"rng_rank{process_index:05d}.pt"
        loaded["rng"] = torch.load(rank_file, weights_only=True) if rank_file.is_file() else None
    except CheckpointError as error:  # a refused file: the message names it
        raise CheckpointError(f"cannot resume from checkpoint {path}: {error}") from None
    # DCP's CheckpointException (another architecture: missing keys) derives from BaseException, not Exception
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - a refused pickle, a damaged file
        raise CheckpointError(f"cannot resume from checkpoint {path}: {unusable_because(error)}") from None
    return loaded
