"""csi_dist.api: the README's custom loop learns, the four seed metric functions are compute_metrics split by key,
train_model and load_checkpoint round-trip a run's weights, and the loaders behave as the trainer's."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from csi_dist import api
from csi_dist.evaluation.metrics import compute_metrics


def readme_example() -> str:
    """The README's custom-loop example: the first python block of its "Python API" section. It defines
    main(shard_dir, overrides); the test calls it on the small session phantom (smaller images, fewer epochs)."""
    section = (REPO_ROOT / "README.md").read_text().split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


EXAMPLE = readme_example()

SMALL = ["data.image_size=32", "training.num_workers=0", "training.batch_size=16", "logging.wandb_mode=disabled"]


@pytest.fixture
def elsewhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a user's own directory: the example named configs/demo.ini relative to the clone


def run_example(shard_dir: Path, overrides: list[str]) -> tuple[torch.nn.Module, api.MetricsTracker]:
    namespace = {"__name__": "readme_example"}  # not __main__: defines main() without running it
    exec(compile(EXAMPLE, "README.md (Python API example)", "exec"), namespace)
    return namespace["main"](shard_dir=str(shard_dir), overrides=overrides)


def test_readme_example_learns(phantom_shards, elsewhere, capsys):
    overrides = [*SMALL, "training.n_epochs=3"]
    config = api.load_config(api.DEMO_CONFIG, [f"data.shard_dir={phantom_shards}", *overrides])
    torch.manual_seed(config.training.seed)
    untrained = api.build_model(config)
    _, val_loader = api.make_loaders(config)
    before = api.validate_epoch(untrained, val_loader, api.create_criterion(config))

    model, tracker = run_example(phantom_shards, overrides)

    assert len(tracker) == 3 and tracker["epoch"] == [0, 1, 2]
    assert "epoch 2: train" in capsys.readouterr().out
    after = api.validate_epoch(model, val_loader, api.create_criterion(config))  # the best epoch's weights
    assert any(after["loss"] == pytest.approx(value, rel=1e-5) for value in tracker["val_loss"])  # an epoch's weights
    assert after["loss"] < 0.85 * before["loss"], (before["loss"], tracker.history)
    assert after["n_images"] == before["n_images"] == config_val_images(phantom_shards)


def config_val_images(shard_dir: Path) -> int:
    return api.make_loaders(api.load_config(None, [f"data.shard_dir={shard_dir}"]), splits=("val",))[0].num_samples


def random_predictions(seed: int, n: int = 40):
    rng = np.random.default_rng(seed)
    zone_probs = rng.dirichlet(np.ones(5), size=(n, 6))
    zone_targets = rng.integers(0, 5, size=(n, 6))
    zone_targets[0] = 4  # an image with no graded zone
    csi_truth = np.where(rng.random(n) < 0.2, np.nan, rng.uniform(0, 3, n))
    ahf_truth = np.where(rng.random(n) < 0.2, np.nan, rng.integers(0, 2, n).astype(float))
    return zone_probs, zone_targets, csi_truth, ahf_truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seed_metric_functions_are_compute_metrics_split_by_key(seed):
    zone_probs, zone_targets, csi_truth, ahf_truth = random_predictions(seed)
    expected = compute_metrics(zone_probs, zone_targets, csi_truth, ahf_truth)
    parts = [api.compute_f1_metrics(zone_probs, zone_targets),
             api.compute_precision_recall(zone_probs, zone_targets),
             api.compute_csi_average_metrics(zone_probs, zone_targets, csi_truth),
             api.compute_ahf_classification_metrics(zone_probs, zone_targets, ahf_truth)]
    merged = {}
    for part in parts:
        assert part["n_images"] == expected["n_images"]
        assert not (set(part) - {"n_images"}) & set(merged), "each key belongs to one function"
        merged.update(part)
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert (math.isnan(value) and math.isnan(merged[key])) or merged[key] == value, key
    assert {"f1_weighted", "right_sup/f1_macro"} <= set(parts[0])
    assert {"precision_macro", "recall_macro", "unknown_recall"} <= set(parts[1])
    assert {"csi_mae", "csi_csv_mae"} <= set(parts[2]) and {"ahf_f1_macro", "ahf_auroc"} <= set(parts[3])
    assert "csi_csv_mae" not in api.compute_csi_average_metrics(zone_probs, zone_targets)


def test_train_model_and_load_checkpoint_of_its_run_directory(phantom_shards, elsewhere, tmp_path: Path):
    config = api.load_config(api.DEMO_CONFIG)  # a Config plus overrides, as a user holding one would call it
    result = api.train_model(config, tmp_path / "run", overrides=[f"data.shard_dir={phantom_shards}", *SMALL,
                                                                  "training.n_epochs=1"])
    assert result.status == 0 and result.run_dir == tmp_path / "run"
    assert [record["epoch"] for record in result.history] == [0]
    assert math.isfinite(result.history[0]["val_loss"])
    assert result.best_weights is not None and result.last_weights is not None
    # printed, it says what a user acts on (it printed the whole history and a bare status integer)
    assert repr(result) == (f"TrainResult({tmp_path / 'run'}, finished (exit 0), 1 evaluation(s), best val_loss "
                            f"{result.history[0]['val_loss']:.4g} at epoch 0, best weights {result.best_weights}, "
                            f"last weights {result.last_weights})")

    model = api.build_model(result.run_dir / "resolved_config.ini")
    saved = load_file(str(result.best_weights))
    name = "zone_head.weight"
    assert not torch.equal(model.state_dict()[name], saved[name])
    assert api.load_checkpoint(model, result.run_dir) == result.best_weights
    assert all(torch.equal(model.state_dict()[key], saved[key]) for key in saved)

    result.best_weights.unlink()  # a run without best weights: its last ones
    assert api.load_checkpoint(model, result.run_dir) == result.last_weights
    checkpoint = next((result.run_dir / "checkpoints").iterdir())
    with pytest.raises(api.CheckpointError, match="resumable trainer checkpoint"):
        api.load_checkpoint(model, checkpoint)
    other = api.build_model(api.load_config(None, ["model.model_arch=test_convnext", "data.image_size=32"]))
    with pytest.raises(api.CheckpointError, match="does not fit"):
        api.load_checkpoint(other, result.last_weights)


def test_loaders_masks_epochs_and_bookkeeping(phantom_shards):
    config = api.load_config(None, [f"data.shard_dir={phantom_shards}", *SMALL])
    train_loader, val_loader = api.make_loaders(config)
    first = [batch["file_id"] for batch in train_loader]
    second = [batch["file_id"] for batch in train_loader]
    assert len(first) == len(train_loader) == math.ceil(train_loader.num_samples / 16)
    assert first != second, "each pass over the train loader is the next epoch"
    train_loader.set_epoch(0)
    assert [batch["file_id"] for batch in train_loader] == first
    val_batches = list(val_loader)
    assert int(sum(api.sample_mask(batch).sum() for batch in val_batches)) == val_loader.num_samples
    assert [batch["file_id"] for batch in val_loader] == [batch["file_id"] for batch in val_batches]

    meter = api.AverageMeter()
    meter.update(1.0, n=3)
    meter.update(3.0)
    assert (meter.sum, meter.count, meter.avg, meter.val) == (6.0, 4, 1.5, 3.0)
    tracker = api.MetricsTracker()
    tracker.add({"epoch": 0, "val_loss": 1.0, "val_f1_weighted": 0.2})
    tracker.add(epoch=1, val_loss=float("nan"), val_f1_weighted=0.5)
    assert tracker.best("val_loss")["epoch"] == 0 and tracker.best("val_f1_weighted")["epoch"] == 1


def test_train_epoch_skips_a_non_finite_step_without_touching_buffers_or_the_epoch_mean(phantom_shards):
    config = api.load_config(None, [f"data.shard_dir={phantom_shards}", *SMALL, "model.model_arch=Tiny_CNN"])
    torch.manual_seed(0)
    model = api.build_model(config)
    train_loader, = api.make_loaders(config, splits=("train",))
    criterion, optimizer = api.create_criterion(config), api.create_optimizer(model, config)
    calls = []

    def nan_in_the_second_forward(module, inputs, output):  # a NaN activation before BatchNorm sees it
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    first_layer = next(module for module in model.modules() if isinstance(module, torch.nn.Conv2d))
    first_layer.register_forward_hook(nan_in_the_second_forward)
    counts_before = {name: int(buffer) for name, buffer in model.named_buffers() if "num_batches" in name}

    mean_loss = api.train_epoch(model, train_loader, criterion, optimizer)

    assert math.isfinite(mean_loss)
    assert all(bool(torch.isfinite(buffer.float()).all()) for buffer in model.state_dict().values())
    steps = len(train_loader)
    assert {name: int(buffer) for name, buffer in model.named_buffers() if "num_batches" in name} == \
        {name: count + steps - 1 for name, count in counts_before.items()}
