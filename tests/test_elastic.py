"""Elastic global batch (issue 18): with training.global_batch_size a run requeued onto another number of processes
trains on the same global batches, in the same order, to the same weights."""
from __future__ import annotations

import pytest

from csi_dist.cluster.preemption import REQUEST_FILE_NAME
from csi_dist.core.exit_codes import EXIT_PREEMPTED
from csi_dist.core.config import ConfigError
from csi_dist.data.shards.plan import plan_epoch
from csi_dist.training.accumulation import split_global_batch
from data_helpers import assert_strategies_ran
from test_parity import LOSS_RTOL, PARITY_SETTINGS, WEIGHT_ATOL, parameter_count, train_runs, training_differences

GLOBAL_BATCH, MAX_MICRO_BATCH = 12, 4
# The tolerances (tests/test_parity.py's LOSS_RTOL and WEIGHT_ATOL, 1e-5) against what was measured (CPU) between
# each elastic run and the uninterrupted reference: DDP 2 -> 1 -> 3 processes, 2.5e-7 relative in a per-update train
# loss and 1.2e-7 absolute in a final weight; ZeRO-2 2 -> 1, 1.7e-7 and 6.0e-8. The same runs with the AdamW state
# dropped at each resume (model and schedule restored): 0.16 and 4.3e-3 (DDP), 0.064 and 6.9e-3 (ZeRO-2).


def update_samples(shard_counts: list[int], world_size: int) -> list[set[int]]:
    """The (shard, index) pairs of the real samples of each update of epoch 0, on `world_size` processes."""
    micro_batch, accumulation = split_global_batch(GLOBAL_BATCH, world_size, MAX_MICRO_BATCH)
    plan = plan_epoch(shard_counts, epoch=0, seed=7, shuffle=True, shuffle_window=50, world_size=world_size,
                      batch_size=micro_batch, num_workers=2)
    updates = []
    for first_step in range(0, plan.steps, accumulation):
        samples = set()
        for step in range(first_step, min(first_step + accumulation, plan.steps)):
            for rank in range(world_size):
                for position in plan.batch_positions(step, rank):
                    shard, index, is_padding = plan.sample_at(position)
                    if not is_padding:
                        samples.add((shard, index))
        updates.append(samples)
    return updates


def test_the_global_batches_are_the_same_samples_on_any_world_size():
    counts = [17, 9, 30, 4]  # 60 samples: 5 updates of 12
    reference = update_samples(counts, 2)
    assert [len(update) for update in reference] == [12] * 5
    for world_size in (1, 3, 4, 6, 12):
        assert update_samples(counts, world_size) == reference, world_size
    assert split_global_batch(12, 2, 4) == (3, 2) and split_global_batch(12, 1, 4) == (4, 3)
    with pytest.raises(ConfigError, match="training.global_batch_size = 12 cannot be split .* over 5 processes"):
        split_global_batch(12, 5, 4)


def elastic_settings(shards) -> list[str]:
    """10 updates (stopped at 3 and 6 where preempted). AdamW: the optimizer state DeepSpeed's universal checkpoint
    carries (SGD's is refused), so one reference serves the DDP and the ZeRO-2 runs."""
    return [f"data.shard_dir={shards}", *PARITY_SETTINGS, f"training.global_batch_size={GLOBAL_BATCH}",
            f"training.batch_size={MAX_MICRO_BATCH}", "callbacks.preemption_check_every_steps=3",
            "training.n_epochs=1", "optimization.optimizer=adamw", "optimization.learning_rate=0.001"]


@pytest.fixture(scope="module")
def two_process_reference(phantom_shards, tmp_path_factory):
    """The uninterrupted 2-process DDP run (micro-batch 3 x 2 accumulation steps) the elastic runs must match."""
    out = tmp_path_factory.mktemp("elastic_reference")
    assert train_runs(2, out, elastic_settings(phantom_shards), {"reference": ""}) == {"reference": 0}
    assert_strategies_ran(out / "reference", [("ddp", None, 2)], parameter_count(out / "reference"))
    return out / "reference"


def preempted_segments(tmp_path, settings, segments) -> str:
    """Train tmp_path/elastic in segments of (world size, expected exit); a notice stops each preempted one."""
    run_dir = tmp_path / "elastic"
    for world_size, expected in segments:
        if expected == EXIT_PREEMPTED:
            run_dir.mkdir(exist_ok=True)
            (run_dir / REQUEST_FILE_NAME).touch()  # a notice: the segment checkpoints at its next check and stops
        assert train_runs(world_size, tmp_path, settings, {"elastic": ""}, env=None) == {"elastic": expected}
    return "".join(path.read_text() for path in sorted(tmp_path.glob("statuses-*.log")))


@pytest.mark.slow
@pytest.mark.distributed
def test_a_run_requeued_onto_1_then_3_processes_ends_with_the_weights_of_an_uninterrupted_2_process_run(
        phantom_shards, two_process_reference, tmp_path):
    """2 processes (micro-batch 3 x 2 accumulation steps), preempted, resumed on 1 (4 x 3), preempted, resumed on 3
    (4 x 1): the same 12-image updates as the uninterrupted 2-process run, so the same weights within fp32 rounding."""
    log = preempted_segments(tmp_path, elastic_settings(phantom_shards),
                             ((2, EXIT_PREEMPTED), (1, EXIT_PREEMPTED), (3, 0)))
    for world_size, micro, accumulation in ((2, 3, 2), (1, 4, 3), (3, 4, 1)):
        assert f"global batch 12 = {world_size} process(es) x micro-batch {micro} x {accumulation}" in log
    assert_strategies_ran(tmp_path / "elastic", [("ddp", None, 2), ("ddp", None, 1), ("ddp", None, 3)],
                          parameter_count(tmp_path / "elastic"))
    differences = training_differences(tmp_path / "elastic", two_process_reference)
    assert differences["loss_rel"] < LOSS_RTOL and differences["weight_abs"] < WEIGHT_ATOL, differences


@pytest.mark.slow
@pytest.mark.distributed
def test_a_zero2_run_saved_on_2_processes_resumes_on_1_through_a_universal_checkpoint(phantom_shards,
                                                                                      two_process_reference, tmp_path):
    """ZeRO-2 partitions the optimizer state over the processes that saved it; resumed on one process, DeepSpeed's
    universal checkpoint (converted once, beside the original) carries it over, and the run ends with the weights
    of the uninterrupted 2-process run (DDP: ZeRO-2 trains like it, tests/test_parity.py)."""
    settings = [*elastic_settings(phantom_shards), "training.strategy=deepspeed", "training.zero_stage=2"]
    log = preempted_segments(tmp_path, settings, ((2, EXIT_PREEMPTED), (1, 0)))
    assert "ZeRO checkpoint of 2 process(es) resumed on 1: converting it to DeepSpeed's universal checkpoint" in log
    assert "resumed from" in log and "step-00000003" in log
    assert_strategies_ran(tmp_path / "elastic", [("deepspeed", 2, 2), ("deepspeed", 2, 1)],
                          parameter_count(tmp_path / "elastic"))
    differences = training_differences(tmp_path / "elastic", two_process_reference)
    assert differences["loss_rel"] < LOSS_RTOL and differences["weight_abs"] < WEIGHT_ATOL, differences
