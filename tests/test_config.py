"""Config: the seed project's INI files load, mistakes are named, overrides apply, the resolved file round-trips."""
from __future__ import annotations

from pathlib import Path

import pytest

from csi_dist.core.config import ConfigError, load_config, save_config

SEED_INI = """
[Training]
BATCH_SIZE = 128
N_EPOCHS = 50
PATIENCE = 10   # early stopping, as the seed meant it
LEARNING_RATE = 0.001

[Model]
MODEL_ARCH = resnet50
DROPOUT_RATE = 0.5
ZONE_FOCUS_METHOD = spatial_reduction

[Optimization]
optimizer = adam
scheduler = ReduceLROnPlateau
patience = 5
factor = 0.5
weight_decay = 0.01

[Loss]
unknown_weight = 0.3

[Callbacks]
early_stopping_patience = 12
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.ini"
    path.write_text(text)
    return path


def test_seed_ini_loads_with_its_keys_mapped(tmp_path: Path):
    config = load_config(write(tmp_path, SEED_INI))
    assert config.training.batch_size == 128 and config.training.n_epochs == 50
    assert config.optimization.learning_rate == 0.001  # seed put it under [Training]
    assert config.optimization.patience == 5 and config.optimization.factor == 0.5
    assert config.callbacks.early_stopping_patience == 12  # [Callbacks] wins over [Training] PATIENCE (read later)
    assert config.model.model_arch == "resnet50"


def test_num_workers_lives_under_data_and_its_old_training_key_still_loads(tmp_path: Path):
    """data.num_workers since issue 33; the seed's and earlier runs' [Training] num_workers and --set
    training.num_workers load into it, and a saved config writes it under [data] (a resumed old run sees no change)."""
    old_style = load_config(write(tmp_path, SEED_INI.replace("N_EPOCHS = 50", "N_EPOCHS = 50\nnum_workers = 3")))
    assert old_style.data.num_workers == 3 and not hasattr(old_style.training, "num_workers")
    assert load_config(None, ["training.num_workers=5"]).data.num_workers == 5
    assert load_config(None, ["data.num_workers=6"]).data.num_workers == 6
    save_config(old_style, tmp_path / "saved.ini")
    saved = (tmp_path / "saved.ini").read_text()
    assert "num_workers = 3" in saved.split("[Data]")[1].split("[")[0] and "num_workers" not in saved.split("[Data]")[0]
    assert load_config(tmp_path / "saved.ini") == old_style


def test_the_seeds_heatmap_keys_load_from_its_heatmap_section_or_any_other(tmp_path: Path):
    config = load_config(write(tmp_path, SEED_INI + "[HEATMAP]\nheatmap_enabled = True\nheatmap_samples_per_epoch = 3\n"
                               "heatmap_generate_per_epoch = False\nheatmap_color_map = custom_purple_red\n"))
    assert (config.heatmap.enabled, config.heatmap.images, config.heatmap.every_epoch, config.heatmap.color_map) == \
        (True, 3, False, "custom_purple_red")
    flattened = load_config(write(tmp_path, SEED_INI.replace("[Loss]", "heatmap_generate_per_epoch = yes\n[Loss]")))
    assert flattened.heatmap.every_epoch and not flattened.heatmap.enabled
    with pytest.raises(ConfigError, match=r"\[HEATMAP\] heatmap_color_map: 'purple_red' is not a matplotlib colormap"):
        load_config(write(tmp_path, SEED_INI + "[HEATMAP]\nheatmap_color_map = purple_red\n"))


def test_unknown_key_names_the_closest_valid_key(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"config.ini \[Training\] bach_size: unknown key 'bach_size'; "
                                          r"did you mean 'training.batch_size'"):
        load_config(write(tmp_path, "[Training]\nbach_size = 4\n"))


def test_wrong_type_and_bad_choice_are_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"\[Training\] batch_size: expected int, got 'many'"):
        load_config(write(tmp_path, "[Training]\nbatch_size = many\n"))
    with pytest.raises(ConfigError, match="'rmsprop' is not one of adam, adamw, sgd"):
        load_config(None, ["optimization.optimizer=rmsprop"])


def test_overrides_and_round_trip(tmp_path: Path):
    config = load_config(write(tmp_path, SEED_INI), ["training.batch_size=8", "loss.unknown_weight=0.7"])
    assert config.training.batch_size == 8 and config.loss.unknown_weight == 0.7
    save_config(config, tmp_path / "resolved.ini")
    assert load_config(tmp_path / "resolved.ini") == config
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["batch_size=8"])


def test_run_name_cannot_escape_the_output_directory():
    with pytest.raises(ConfigError, match="must be a plain name"):
        load_config(None, ["logging.run_name=../../etc"])


def test_shipped_configs_load(repo_root: Path):
    configs = sorted((repo_root / "configs").glob("*.ini"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(("section", "key", "value", "expected"), [
    ("Callbacks", "checkpoint_every_epochs", "0", "must be >= 1"),
    ("Training", "log_every_steps", "0", "must be >= 1"),
    ("Data", "image_size", "-32", "must be >= 0"),
    ("Training", "num_workers", "-1", "must be >= 0"),
    ("Optimization", "weight_decay", "-1", "must be >= 0"),
    ("Optimization", "warmup_epochs", "-1", "must be >= 0"),
    ("Loss", "unknown_weight", "inf", "expected a finite float"),
    ("Model", "dropout_rate", "1.0", "must be [0, 1)"),
    ("Callbacks", "monitor", "csi_pearson_rr", "is not a validation metric"),
])
def test_out_of_range_settings_are_named_with_file_section_and_key(tmp_path: Path, section, key, value, expected):
    path = tmp_path / "bad.ini"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path} [{section}] {key}" in str(error.value) and expected in str(error.value)


def test_monitored_metrics_improve_in_the_right_direction_everywhere():
    from csi_dist.core.domain import metric_direction
    from csi_dist.tuning.space import SearchSpace
    assert [metric_direction(name) for name in ("val_loss", "csi_pearson_r", "csi_mae", "val_f1_weighted")] == [
        "min", "max", "min", "max"]
    assert SearchSpace(path=Path("x.yaml"), params=[], objective="csi_pearson_r").study_direction() == "maximize"
    config = load_config(None, ["callbacks.monitor=val_f1_weighted"])  # the history's spelling is accepted too
    assert config.callbacks.monitor == "val_f1_weighted"


def test_help_config_lists_every_dataclass_field_with_its_default_and_the_rows_users_rely_on(capsys):
    """`--help-config` against the Config dataclasses walked field by field, and a few rows spelled out in full."""
    import dataclasses

    from csi_dist.core.config import Config
    from csi_dist.train import main
    assert main(["--help-config"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == ["| key | type | default | accepts | meaning |", "|---|---|---|---|---|"]
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    fields = [(section.name, key) for section in dataclasses.fields(Config)
              for key in dataclasses.fields(section.default_factory())]
    assert len(lines) - 2 == len(rows) == len(fields) > 50  # one row per key, none twice, none extra
    for section, key in fields:
        value = getattr(getattr(Config(), section), key.name)
        cells = [cell.strip() for cell in rows[f"{section}.{key.name}"].strip("|").split("|")]
        assert cells[1:3] == [key.type, repr(value)], (section, key.name, cells)
        assert cells[4], f"{section}.{key.name} has no meaning in --help-config"
    # rows a user reads to set a value: type, default, the range or the choices, and the meaning, letter for letter
    assert rows["loss.unknown_weight"] == ("| loss.unknown_weight | float | 0.3 | >= 0 | class weight of unknown zones "
                                           "(4) in WeightedCSILoss; grades 0-3 weigh 1 |")
    assert rows["callbacks.monitor"] == ("| callbacks.monitor | str | 'val_loss' | val_loss or a validation metric | "
                                         "val_loss (minimised) or a validation metric key such as f1_weighted "
                                         "(maximised) |")
    assert rows["training.strategy"].startswith("| training.strategy | str | 'auto' | auto, ddp, fsdp2, deepspeed |")
    assert rows["training.zero_stage"].startswith("| training.zero_stage | int | 2 | [1, 3] |")
    assert rows["model.dropout_rate"].startswith("| model.dropout_rate | float | 0.5 | [0, 1) |")
    assert rows["optimization.factor"].startswith("| optimization.factor | float | 0.5 | (0, 1) |")
    assert rows["callbacks.checkpoint_every_epochs"].startswith(
        "| callbacks.checkpoint_every_epochs | int | 1 | >= 1 |")
