"""Typed run configuration: loads the seed project's INI files unchanged, validates keys and types, applies overrides."""
from __future__ import annotations

import configparser
import dataclasses
import difflib
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

from csi_dist.redaction import redact

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file, section and key."""


@dataclass
class TrainingConfig:
    batch_size: int = 32  # per process (per GPU)
    n_epochs: int = 100
    seed: int = 42
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"  # auto = bf16 on a GPU that supports it, else no
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit)
    num_workers: int = 4
    log_every_steps: int = 20
    deterministic: bool = False
    cudnn_benchmark: bool = False  # autotuning: no faster on an H100, twice the time to the first step
    eval_every_epochs: int = 1
    max_bad_steps: int = 20  # non-finite losses tolerated (each skipped) before the run stops
    strategy: str = "auto"  # auto (from the accelerate launch config, else ddp), ddp, fsdp2 or deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage when the strategy is deepspeed
    collective_timeout_s: int = 900  # a rank that waits longer than this on the others fails instead of hanging


@dataclass
class DataConfig:
    shard_dir: str = "data/demo_shards"
    image_size: int = 0  # 0 = the backbone's native input size
    normalization: str = "medical"  # medical (0.5/0.5) or imagenet (grayscale mean/std)
    augment: bool = True
    shuffle_window: int = 1024  # samples shuffled together in an epoch (across shard boundaries)


@dataclass
class ModelConfig:
    model_arch: str = "ResNet50"
    pretrained_weights: str = ""  # local file; nothing is downloaded at run time
    dropout_rate: float = 0.5
    channels_last: bool = True
    compile: bool = False


@dataclass
class OptimizationConfig:
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    scheduler: str = "ReduceLROnPlateau"
    patience: int = 5  # ReduceLROnPlateau patience, in evaluations
    factor: float = 0.5
    step_size: int = 10  # StepLR, in epochs
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    grad_clip_norm: float = 0.0  # 0 = no clipping


@dataclass
class LossConfig:
    unknown_weight: float = 0.3


@dataclass
class CallbacksConfig:
    early_stopping_patience: int = 10  # in evaluations; 0 = off
    early_stopping_min_delta: float = 0.001
    monitor: str = "val_loss"  # val_loss (minimised) or a validation metric key such as f1_weighted (maximised)
    checkpoint_every_steps: int = 0  # periodic checkpoints inside an epoch (0 = off)
    checkpoint_every_epochs: int = 1
    keep_last_checkpoints: int = 2
    preemption_check_every_steps: int = 10
    max_failure_requeues: int = 3  # SLURM requeues of a run after a rank died or hung (preemptions not counted)


@dataclass
class LoggingConfig:
    run_name: str = ""  # empty = <timestamp>_<model_arch>
    output_dir: str = "checkpoints"
    wandb_mode: str = "offline"  # offline, online or disabled
    wandb_project: str = "csi_dist"
    wandb_group: str = ""


@dataclass
class Config:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


SECTION_FIELDS = {f.name: f.type for f in dataclasses.fields(Config)}

# Keys of the seed project that live under a different name or section here: (section, key) -> (section, key).
# The seed flattened its INI sections, so its keys are accepted in any of its sections.
SEED_KEY_ALIASES: dict[str, tuple[str, str]] = {
    "early_stopping_patience": ("callbacks", "early_stopping_patience"),
    "scheduler_type": ("optimization", "scheduler"),
    "normalization_strategy": ("data", "normalization"),
    "excluded_file_ids": ("data", "excluded_file_ids"),
}
# Seed keys that still load but no longer do anything (the seed's zone-masking model and paths): warned, not errors.
SEED_IGNORED_KEYS = {
    "device", "load_data_to_memory", "labels_csv", "labels_csv_separator", "excluded_file_ids",
    "use_official_processor", "zone_focus_method", "use_segmentation_masking", "masking_strategy",
    "attention_strength", "image_format", "image_extension", "custom_mean", "custom_std",
    "heatmap_enabled", "heatmap_samples_per_epoch", "heatmap_generate_per_epoch", "heatmap_color_map",
}
IGNORED_SECTIONS = {"heatmap", "paths", "data_paths"}

CHOICES = {
    ("training", "mixed_precision"): ("auto", "bf16", "fp16", "no"),
    ("training", "strategy"): ("auto", "ddp", "fsdp2", "deepspeed"),
    ("data", "normalization"): ("medical", "imagenet"),
    ("optimization", "optimizer"): ("adam", "adamw", "sgd"),
    ("optimization", "scheduler"): ("reducelronplateau", "steplr", "cosine", "none"),
    ("logging", "wandb_mode"): ("offline", "online", "disabled"),
}


def _section_type(section: str) -> type:
    return typing.get_type_hints(Config)[section]


def _field_types(section: str) -> dict[str, type]:
    return typing.get_type_hints(_section_type(section))


def _parse_value(raw: str, kind: type, where: str) -> object:
    text = raw.split(" #")[0].split(" ;")[0].strip()  # inline comments, as the seed allowed
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            as_float = float(text)
            if as_float != int(as_float):
                raise ValueError(text)
            return int(as_float)
        if kind is float:
            return float(text)
        return text.strip("\"'")
    except ValueError:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {raw!r}") from None


def _resolve_key(section: str, key: str, where: str) -> tuple[str, str] | None:
    """Canonical (section, key) for a key found in `section`; None for a seed key that is ignored."""
    key = key.lower()
    if section in SECTION_FIELDS and key in _field_types(section):
        return section, key
    if section == "training" and key == "patience":
        return "callbacks", "early_stopping_patience"  # the seed's PATIENCE meant early stopping
    if key in SEED_KEY_ALIASES and SEED_KEY_ALIASES[key][1] in _field_types(SEED_KEY_ALIASES[key][0]):
        return SEED_KEY_ALIASES[key]
    for other in SECTION_FIELDS:
        if key in _field_types(other) and not (other == "optimization" and key == "patience"):
            return other, key
    if key in SEED_IGNORED_KEYS:
        log.warning("%s: seed key %r has no effect in csi_dist and is ignored", where, key)
        return None
    valid = [f"{s}.{k}" for s in SECTION_FIELDS for k in _field_types(s)]
    close = difflib.get_close_matches(f"{section}.{key}", valid, n=1, cutoff=0.5) or difflib.get_close_matches(
        key, [v.split(".")[1] for v in valid], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def section_of(key: str) -> str:
    """The section that owns a bare key (for sweep results written as {"learning_rate": ...})."""
    for section in SECTION_FIELDS:
        if key.lower() in _field_types(section):
            return section
    raise ConfigError(f"unknown key {key!r}: expected one of the config keys, e.g. optimization.learning_rate")


def _set_value(config: Config, section: str, key: str, raw: str, where: str) -> None:
    kind = _field_types(section)[key]
    value = _parse_value(raw, kind, where)
    choices = CHOICES.get((section, key))
    if choices and str(value).lower() not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    setattr(getattr(config, section), key, value)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from defaults, then the INI file (seed format accepted), then `section.key=value` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as error:
            raise ConfigError(f"{path}: not a valid INI file: {error}") from None
        for section_name in parser.sections():
            section = section_name.lower()
            if section in IGNORED_SECTIONS:
                log.warning("%s: section [%s] is ignored by csi_dist", path, section_name)
                continue
            if section not in SECTION_FIELDS:
                close = difflib.get_close_matches(section, list(SECTION_FIELDS), n=1)
                hint = f"; did you mean [{close[0].capitalize()}]?" if close else ""
                raise ConfigError(f"{path}: unknown section [{section_name}]{hint}")
            for key, raw in parser.items(section_name):
                where = f"{path} [{section_name}] {key}"
                target = _resolve_key(section, key, where)
                if target is not None:
                    _set_value(config, *target, raw, where)
    for override in overrides:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise ConfigError(f"override {override!r}: expected section.key=value, e.g. training.batch_size=16")
        dotted, raw = override.split("=", 1)
        section, key = (part.strip().lower() for part in dotted.split(".", 1))
        where = f"override {override!r}"
        if section not in SECTION_FIELDS:
            close = difflib.get_close_matches(section, list(SECTION_FIELDS), n=1)
            raise ConfigError(f"{where}: unknown section {section!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        target = _resolve_key(section, key, where)
        if target is not None:
            _set_value(config, *target, raw, where)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    checks = [
        (config.training.batch_size >= 1, "training.batch_size must be >= 1"),
        (config.training.n_epochs >= 1, "training.n_epochs must be >= 1"),
        (config.training.gradient_accumulation_steps >= 1, "training.gradient_accumulation_steps must be >= 1"),
        (config.optimization.learning_rate > 0, "optimization.learning_rate must be > 0"),
        (0.0 <= config.model.dropout_rate < 1.0, "model.dropout_rate must be in [0, 1)"),
        (config.loss.unknown_weight >= 0, "loss.unknown_weight must be >= 0"),
        (config.callbacks.keep_last_checkpoints >= 1, "callbacks.keep_last_checkpoints must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if Path(config.logging.run_name).name != config.logging.run_name or config.logging.run_name in ("..", "."):
        raise ConfigError(f"logging.run_name {config.logging.run_name!r} must be a plain name, not a path")


def config_to_dict(config: Config) -> dict[str, dict[str, object]]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as INI (loadable by load_config). Keys come from the environment; a value that
    holds one anyway (e.g. a token pasted into an override) is written masked."""
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in config_to_dict(config).items():
        parser[section.capitalize()] = {key: redact(str(value)) for key, value in values.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        parser.write(handle)
    temporary.replace(path)
