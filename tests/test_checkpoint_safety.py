"""Nothing csi_dist loads runs code (issue 30, item 1): a pickle planted in a DCP data file, a DeepSpeed state file
or a universal checkpoint is refused, naming the file, before anything unpickles it; resume and convert both say so.

Cheap: the checkpoints are written in this process with torch.distributed.checkpoint itself and with a one-process
DeepSpeed engine (gloo, no launcher); the only other process is one `python -m csi_dist.convert`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from conftest import REPO_ROOT, subprocess_env
from data_helpers import Payload
from csi_dist import convert
from csi_dist.core.config import ModelConfig, TrainingConfig
from csi_dist.model.factory import build_model
from csi_dist.training.checkpoint_files import SCHEDULE_FILE, STATE_FILE, CheckpointError, load_checkpoint
from csi_dist.training.accumulation import BatchPlan
from csi_dist.training.deepspeed_strategy import UNIVERSAL_TAG, ZERO_TAG, DeepSpeedStrategy
from csi_dist.training.strategies import DDPStrategy

IMAGE_SIZE = 32
# the run config convert builds its template model from
RUN_CONFIG = f"[Model]\nmodel_arch = Tiny_CNN\n[Data]\nimage_size = {IMAGE_SIZE}\n"


def one_process(num_processes: int = 1) -> types.SimpleNamespace:
    """The accelerator fields the strategies read, for one process (num_processes: what the strategy is told)."""
    return types.SimpleNamespace(num_processes=num_processes, process_index=0, is_main_process=True,
                                 device=torch.device("cpu"), mixed_precision="no", wait_for_everyone=lambda: None)


def trained_tiny_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Tiny_CNN after one AdamW step, so the optimizer has state to save."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(model_arch="Tiny_CNN"), IMAGE_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)).float().sum().backward()
    optimizer.step()
    return model, optimizer


def finish_checkpoint(checkpoint: Path) -> None:
    """The files beside `state/` that make it a csi_dist checkpoint (resume reads them after the state)."""
    torch.save({}, checkpoint / SCHEDULE_FILE)
    (checkpoint / STATE_FILE).write_text("{}")
    (checkpoint.parent.parent / "resolved_config.ini").write_text(RUN_CONFIG)


def planted_dcp_checkpoint(run_dir: Path, marker: Path, where: str) -> Path:
    """A DDP checkpoint written by torch.distributed.checkpoint itself (so `.metadata` is DCP's own, clean) whose
    optimizer param_groups (`where="optimizer"`) or one model entry (`where="model"`) is the payload."""
    model, optimizer = trained_tiny_model()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if where == "optimizer":
        optimizer_state["param_groups"][0]["lr"] = Payload(marker)
    else:
        model_state["zone_head.bias"] = Payload(marker)
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    with warnings.catch_warnings():  # one process, no process group: what DCP warns about is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(checkpoint / "state"))
    finish_checkpoint(checkpoint)
    return checkpoint


def refusal(load) -> str:
    """The message of the CheckpointError `load()` raises ("" when it loads)."""
    try:
        load()
    except CheckpointError as error:
        return str(error)
    return ""


def assert_refused_naming(message: str, file: Path, marker: Path) -> None:
    assert not marker.exists(), "the planted pickle was executed"
    assert str(file) in message and "refused" in message, message
    assert "\n" not in message, message


def test_a_pickle_in_a_dcp_data_file_is_refused_on_resume(tmp_path: Path):
    marker = tmp_path / "owned"
    checkpoint = planted_dcp_checkpoint(tmp_path / "run", marker, "optimizer")
    model, optimizer = trained_tiny_model()
    message = refusal(lambda: load_checkpoint(DDPStrategy(one_process(), TrainingConfig(), 1.0), checkpoint, model,
                                              optimizer, 0))
    assert_refused_naming(message, checkpoint / "state" / "__0_0.distcp", marker)
    assert message.startswith(f"cannot resume from checkpoint {checkpoint}: ")


def test_a_clean_dcp_checkpoint_still_resumes_with_its_optimizer_state(tmp_path: Path):
    """The weights-only reader still fills every non-tensor item (param_groups) and every tensor."""
    model, optimizer = trained_tiny_model()
    optimizer.param_groups[0]["lr"] = 0.125
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    DDPStrategy(one_process(), TrainingConfig(), 1.0).save(model, optimizer, checkpoint / "state")
    finish_checkpoint(checkpoint)
    fresh_model = build_model(ModelConfig(model_arch="Tiny_CNN"), IMAGE_SIZE)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1e-3)
    load_checkpoint(DDPStrategy(one_process(), TrainingConfig(), 1.0), checkpoint, fresh_model, fresh_optimizer, 0)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.125
    for saved, loaded in zip(optimizer.state.values(), fresh_optimizer.state.values(), strict=True):
        assert torch.equal(saved["exp_avg_sq"], loaded["exp_avg_sq"])
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh_model.state_dict()[key]), key


def test_convert_refuses_a_pickle_in_a_dcp_data_file_with_exit_2_and_one_line(tmp_path: Path):
    """End to end, as a user runs it: exit 2, the data file named, no traceback, nothing executed or written."""
    marker = tmp_path / "owned"
    checkpoint = planted_dcp_checkpoint(tmp_path / "run", marker, "model")
    output = tmp_path / "model.safetensors"
    result = subprocess.run([sys.executable, "-m", "csi_dist.convert", str(checkpoint), str(output)],
                            env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert not marker.exists(), "the planted pickle was executed"
    assert f"{checkpoint}/state/__0_0.distcp" in result.stderr and "refused" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not output.exists()



def clean_dcp_checkpoint(run_dir: Path) -> Path:
    model, optimizer = trained_tiny_model()
    checkpoint = run_dir / "checkpoints" / "step-00000001"
    DDPStrategy(one_process(), TrainingConfig(), 0.0).save(model, optimizer, checkpoint / "state")
    finish_checkpoint(checkpoint)
    return checkpoint


def test_convert_names_a_checkpoint_it_cannot_convert_with_exit_2(tmp_path: Path, caplog):
    """A checkpoint copied without its run's resolved_config.ini, or beside the config of another model: exit 2 and
    one line saying which file and why (was a traceback), nothing written."""
    output = tmp_path / "model.safetensors"
    checkpoint = clean_dcp_checkpoint(tmp_path / "run")
    config = checkpoint.parent.parent / "resolved_config.ini"
    config.write_text(RUN_CONFIG.replace("Tiny_CNN", "Custom_1"))
    assert convert.main([str(checkpoint), str(output)]) == 2
    assert f"cannot convert {checkpoint}" in caplog.text and "model.model_arch" in caplog.text, caplog.text
    config.unlink()
    caplog.clear()
    assert convert.main([str(checkpoint), str(output)]) == 2
    assert str(config) in caplog.text, caplog.text
    assert not output.exists()

# ---- DeepSpeed ZeRO: a one-process engine in this process (gloo); its checkpoint is what the trainer writes


@pytest.fixture(scope="module")
def zero_engine():
    """A ZeRO-2 DeepSpeedStrategy on one gloo process with Tiny_CNN and AdamW, one step taken; the process group is
    taken down again after this file's tests."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already up in this process")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
            patch.setenv(name, value)
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
        try:
            yield one_step_zero2_engine()
        finally:
            torch.distributed.destroy_process_group()


def one_step_zero2_engine():
    model, _ = trained_tiny_model()
    strategy = DeepSpeedStrategy(one_process(), TrainingConfig(batch_size=2, zero_stage=2), 1.0)
    engine, optimizer = strategy.prepare(model, BatchPlan(world_size=1, micro_batch=2, accumulation=1),
                                         lambda module: torch.optim.AdamW(module.parameters(), lr=1e-3))
    strategy.gradient_sync(engine, True)
    strategy.backward(engine(torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)).float().sum())
    strategy.step(engine, optimizer, True)
    return strategy, engine, optimizer


@pytest.fixture(scope="module")
def zero_checkpoint(zero_engine, tmp_path_factory) -> Path:
    """A clean ZeRO-2 checkpoint written by the strategy's own save (tests copy it before planting)."""
    strategy, engine, optimizer = zero_engine
    checkpoint = tmp_path_factory.mktemp("zero") / "run" / "checkpoints" / "step-00000001"
    strategy.save(engine, optimizer, checkpoint / "state")
    finish_checkpoint(checkpoint)
    return checkpoint


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint.parent.parent, copy.parent.parent)
    return copy


def plant(file: Path, marker: Path) -> None:
    """The payload inside the state file DeepSpeed wrote, beside its real content."""
    state = torch.load(file, map_location="cpu", weights_only=False)  # our own clean file, written above
    state["planted"] = Payload(marker)
    torch.save(state, file)


def test_a_clean_zero_checkpoint_written_by_our_trainer_still_resumes(zero_engine, zero_checkpoint):
    strategy, engine, optimizer = zero_engine
    loaded = load_checkpoint(strategy, zero_checkpoint, engine, optimizer, 0)
    assert loaded["trainer_state"] == {}


@pytest.mark.parametrize("state_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_pickle_in_a_deepspeed_state_file_is_refused_on_resume(zero_engine, zero_checkpoint, tmp_path, state_file):
    strategy, engine, optimizer = zero_engine
    marker = tmp_path / "owned"
    checkpoint = copy_of(zero_checkpoint, tmp_path)
    planted = checkpoint / "state" / ZERO_TAG / state_file
    plant(planted, marker)
    message = refusal(lambda: load_checkpoint(strategy, checkpoint, engine, optimizer, 0))
    assert_refused_naming(message, planted, marker)


@pytest.mark.parametrize("source", ["zero checkpoint", "universal checkpoint left beside it"])
def test_a_pickle_is_refused_before_the_universal_conversion_and_in_a_universal_checkpoint(
        zero_engine, zero_checkpoint, tmp_path, source):
    """Resumed on another world size, the ZeRO checkpoint goes through DeepSpeed's converter (a process of its own
    that unpickles every state file) and the universal checkpoint it writes beside it; one found there is used as
    it is, so it is checked as well."""
    strategy, engine, optimizer = zero_engine
    marker = tmp_path / "owned"
    checkpoint = copy_of(zero_checkpoint, tmp_path)
    state_dir = checkpoint / "state"
    if source == "zero checkpoint":
        planted = state_dir / ZERO_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        plant(planted, marker)
    else:
        planted = state_dir / UNIVERSAL_TAG / "mp_rank_00_model_states.pt"
        planted.parent.mkdir()
        shutil.copy(state_dir / ZERO_TAG / "mp_rank_00_model_states.pt", planted)
        plant(planted, marker)
    on_two = DeepSpeedStrategy(one_process(num_processes=2), TrainingConfig(batch_size=2, zero_stage=2), 1.0)
    on_two.engine = engine
    message = refusal(lambda: load_checkpoint(on_two, checkpoint, engine, optimizer, 0))
    assert_refused_naming(message, planted, marker)


@pytest.mark.parametrize("state_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_convert_refuses_a_pickle_in_a_deepspeed_state_file_with_exit_2(zero_checkpoint, tmp_path, state_file, caplog):
    marker = tmp_path / "owned"
    checkpoint = copy_of(zero_checkpoint, tmp_path)
    planted = checkpoint / "state" / ZERO_TAG / state_file
    plant(planted, marker)
    output = tmp_path / "model.safetensors"
    assert convert.main([str(checkpoint), str(output)]) == 2
    assert not marker.exists(), "the planted pickle was executed"
    refusal = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(refusal) == 1 and str(planted) in refusal[0] and "refused" in refusal[0], refusal
    assert not output.exists()
