"""The shard reader: exactly-once epochs, equal steps per rank over uneven shards, exact resume, bad shards."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import subprocess_env, torchrun_command
from csi_dist.data.shards.reader import LoaderSettings, ShardError, build_loader, open_split
from csi_dist.data.shards.plan import plan_epoch
from shard_factory import write_shards


def epoch_indices(loader) -> list[list[int]]:
    return [batch["sample_index"].tolist() for batch in loader]


@pytest.mark.parametrize("counts,world,batch,workers", [([10, 3, 7], 2, 4, 2), ([5], 4, 3, 3), ([1, 0, 9, 2], 3, 2, 1)])
def test_plan_covers_every_sample_once_and_gives_equal_steps(counts, world, batch, workers):
    plan = plan_epoch(counts, epoch=3, seed=1, shuffle=True, shuffle_window=4, world_size=world, batch_size=batch,
                      num_workers=workers)
    assert plan.steps == -(-sum(counts) // (world * batch))
    samples, padding = [], 0
    for rank in range(world):
        steps = sorted(step for worker in range(workers) for step in plan.worker_steps(worker))
        assert steps == list(range(plan.steps))  # every step produced by exactly one worker
        for step in steps:
            for position in plan.batch_positions(step, rank):
                shard, index, is_padding = plan.sample_at(position)
                assert 0 <= index < counts[shard]
                padding += is_padding
                if not is_padding:
                    samples.append((shard, index))
    assert sorted(samples) == sorted((shard, i) for shard, count in enumerate(counts) for i in range(count))
    assert padding == plan.steps * world * batch - sum(counts)


def test_global_batches_do_not_depend_on_the_world_size():
    one = plan_epoch([7, 9, 4], epoch=0, seed=5, shuffle=True, shuffle_window=8, world_size=1, batch_size=8,
                     num_workers=1)
    two = plan_epoch([7, 9, 4], epoch=0, seed=5, shuffle=True, shuffle_window=8, world_size=2, batch_size=4,
                     num_workers=2)
    for step in range(one.steps):
        assert list(one.batch_positions(step, 0)) == [*two.batch_positions(step, 0), *two.batch_positions(step, 1)]


def test_two_processes_two_workers_see_every_sample_exactly_once(tmp_path: Path):
    shards = write_shards(tmp_path / "shards", {"train": [11, 3, 7]})  # 3 uneven shards over 2 ranks
    out = tmp_path / "seen.json"
    subprocess.run(torchrun_command(2, "tests/scripts/read_epoch.py", str(shards), str(out), "1", "2"),
                   check=True, env=subprocess_env(), timeout=120, cwd=Path(__file__).resolve().parents[1])
    ranks = json.loads(out.read_text())
    assert [r["steps"] for r in ranks] == [3, 3]  # ceil(21 / (2 * 4)) on both ranks
    assert all(len(r["batches"]) == 3 for r in ranks)
    real = [i for r in ranks for b in r["batches"] for i, pad in zip(b["index"], b["padding"]) if not pad]
    padding = [i for r in ranks for b in r["batches"] for i, pad in zip(b["index"], b["padding"]) if pad]
    assert sorted(real) == list(range(21))
    assert len(padding) == 24 - 21
    ids = [f for r in ranks for b in r["batches"] for f, pad in zip(b["file_id"], b["padding"]) if not pad]
    assert sorted(ids) == [f"train-{i:05d}" for i in range(21)]


def test_epochs_are_shuffled_differently_but_reproducibly(tmp_path: Path):
    shard_set = open_split(write_shards(tmp_path / "s", {"train": [8, 8, 8]}), "train")
    settings = LoaderSettings(batch_size=4, image_size=16, shuffle=True, shuffle_window=6, seed=3, num_workers=0)
    first = epoch_indices(build_loader(shard_set, settings, epoch=0, rank=0, world_size=1))
    again = epoch_indices(build_loader(shard_set, settings, epoch=0, rank=0, world_size=1))
    other = epoch_indices(build_loader(shard_set, settings, epoch=1, rank=0, world_size=1))
    assert first == again
    assert first != other
    assert sorted(sum(first, [])) == sorted(sum(other, [])) == list(range(24))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_position_equals_uninterrupted_order(tmp_path: Path, workers: int):
    shard_set = open_split(write_shards(tmp_path / "s", {"train": [9, 14, 6]}), "train")
    settings = LoaderSettings(batch_size=3, image_size=16, shuffle=True, shuffle_window=5, augment=True, seed=11,
                              num_workers=workers)
    full = [(b["sample_index"].tolist(), b["image"].sum().item())
            for b in build_loader(shard_set, settings, epoch=2, rank=1, world_size=2)]
    for steps_done in (1, 2, 4):
        resumed = build_loader(shard_set, settings, epoch=2, rank=1, world_size=2, start_position=steps_done * 6)
        tail = [(b["sample_index"].tolist(), b["image"].sum().item()) for b in resumed]
        assert tail == full[steps_done:]


def test_corrupt_image_is_a_counted_skip_that_keeps_the_step_count(tmp_path: Path):
    shard_set = open_split(write_shards(tmp_path / "s", {"train": [6, 6]}, corrupt_ids=frozenset({"train-00004"})),
                           "train")
    settings = LoaderSettings(batch_size=4, image_size=16, num_workers=0)
    batches = list(build_loader(shard_set, settings, epoch=0, rank=0, world_size=1))
    assert len(batches) == 3
    failed = [fid for b in batches for fid, bad in zip(b["sample_index"].tolist(), b["decode_failed"]) if bad]
    assert failed == [4]


def test_missing_and_truncated_shards_are_named(tmp_path: Path):
    root = write_shards(tmp_path / "s", {"train": [5, 5]})
    shard = root / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ShardError, match="shard-000001.tar has 1000 bytes"):
        open_split(root, "train")
    shard.unlink()
    with pytest.raises(ShardError, match="missing: .*shard-000001.tar"):
        open_split(root, "train")
    with pytest.raises(ShardError, match="no manifest.json"):
        open_split(tmp_path / "nowhere", "train")


def test_grayscale_decode_and_normalisation(tmp_path: Path):
    shard_set = open_split(write_shards(tmp_path / "s", {"train": [4]}, image_size=16), "train")
    batch = next(iter(build_loader(shard_set, LoaderSettings(batch_size=4, image_size=8), epoch=0, rank=0,
                                   world_size=1)))
    assert batch["image"].shape == (4, 1, 8, 8)
    # sample i is a constant image of value i: medical normalisation maps v to (v / 255 - 0.5) / 0.5
    assert batch["image"][2].mean().item() == pytest.approx((2 / 255 - 0.5) / 0.5, abs=1e-4)
