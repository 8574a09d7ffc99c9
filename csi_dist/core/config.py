"""Typed run configuration: loads the seed project's INI files unchanged, validates keys and types, applies overrides."""
from __future__ import annotations

import ast
import codecs
import configparser
import dataclasses
import difflib
import inspect
import logging
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from csi_dist.core.domain import monitored_metric
from csi_dist.core.files import atomic_write
from csi_dist.core.redaction import redact
from csi_dist.core.run_dir import RunDir
from csi_dist.core.strategy_registry import REGISTRY as STRATEGY_REGISTRY

log = logging.getLogger(__name__)

# the repository's example configs, found from the package (launch/setup.sh installs it editable from the clone), so
# `api.load_config(DEMO_CONFIG)` works from any directory
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.ini"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file, section and key."""


# What Windows editors save when not told UTF-8 (the label CSV reader falls back to it too).
FALLBACK_ENCODING = "cp1252"


@dataclass
class TrainingConfig:
    batch_size: int = 32  # per process (per GPU); with global_batch_size: the largest micro-batch per process
    global_batch_size: int = 0  # images per update on any world size (0: batch_size x accumulation x processes)
    n_epochs: int = 100  # passes over the train split
    seed: int = 42  # seeds weights, data order, augmentation and dropout (per rank and worker)
    gradient_accumulation_steps: int = 1  # micro-batches per update: one update = batch_size x this x processes images
    mixed_precision: str = "auto"  # auto = bf16 on a GPU that supports it, else no
    max_steps: int = 0  # stop after this many optimizer steps in total (0 = no limit)
    log_every_steps: int = 20  # optimizer steps between train/* log lines and scalars
    deterministic: bool = False  # deterministic torch algorithms (slower); for bit-reproducible GPU runs
    cudnn_benchmark: bool = False  # autotuning: no faster on an H100, twice the time to the first step
    eval_every_epochs: int = 1  # validate every N epochs (and after the last one); early stopping counts evaluations
    max_bad_steps: int = 20  # non-finite losses tolerated (each skipped) before the run stops
    strategy: str = "auto"  # auto (from the accelerate launch config, else ddp), ddp, fsdp2 or deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage when the strategy is deepspeed
    collective_timeout_s: int = 900  # a rank that waits longer than this on the others fails instead of hanging
    profile_steps: int = 0  # profile this many optimizer steps after the first 10 (torch.profiler, rank 0; 0 = off)


@dataclass
class DataConfig:
    shard_dir: str = "data/demo_shards"  # directory of csi-shards output (manifest.json, split shards)
    image_size: int = 0  # 0 = the backbone's native input size
    normalization: str = "medical"  # medical (0.5/0.5) or imagenet (grayscale mean/std)
    augment: bool = True  # random affine and intensity jitter on training images
    # auto: on a GPU the workers only read and decode (uint8 out); true: also on a CPU, in the main process
    gpu_augment: str = "auto"  # where images are normalised and augmented: on the device (auto/true) or in workers
    shuffle_window: int = 1024  # samples shuffled together in an epoch (across shard boundaries)
    # [Training] num_workers, where the seed project and earlier csi_dist configs put it, still loads here
    num_workers: int = 4  # data-loader processes per rank (0 = load in the training process)
    max_bad_fraction: float = 0.01  # share of a split that may be undecodable (skipped) before a run stops


@dataclass
class ModelConfig:
    model_arch: str = "ResNet50"  # ResNet50, CheXNet, RadDINO, Custom_1, Tiny_CNN (smoke tests) or a timm name
    pretrained_weights: str = ""  # local file; nothing is downloaded at run time
    dropout_rate: float = 0.5  # dropout before the zone head
    channels_last: bool = True  # channels_last memory for timm CNNs (used under DDP only)
    compile: bool = False  # torch.compile the model (kernels cached in the run directory)


@dataclass
class OptimizationConfig:
    optimizer: str = "adam"  # adam, adamw or sgd
    learning_rate: float = 1e-3  # peak learning rate
    weight_decay: float = 0.01  # L2 (adam, sgd) or decoupled (adamw) weight decay
    momentum: float = 0.9  # SGD momentum
    scheduler: str = "ReduceLROnPlateau"  # ReduceLROnPlateau, StepLR, cosine (per step, after warmup) or none
    patience: int = 5  # ReduceLROnPlateau patience, in evaluations
    factor: float = 0.5  # ReduceLROnPlateau: multiply the LR by this on a plateau
    step_size: int = 10  # StepLR, in epochs
    gamma: float = 0.1  # StepLR: multiply the LR by this every step_size epochs
    warmup_epochs: float = 0.0  # linear warmup from 0 (fractions of an epoch allowed)
    min_lr: float = 0.0  # lower bound of the LR schedules
    grad_clip_norm: float = 0.0  # 0 = no clipping
    # fused kernels also skip a non-finite update on the device (adam/adamw: no host sync); never under FSDP2/DeepSpeed
    fused_optimizer: str = "auto"  # auto (on a GPU), true (also on a CPU), false


@dataclass
class LossConfig:
    unknown_weight: float = 0.3  # class weight of unknown zones (4) in WeightedCSILoss; grades 0-3 weigh 1


@dataclass
class CallbacksConfig:
    early_stopping_patience: int = 10  # in evaluations; 0 = off
    early_stopping_min_delta: float = 0.001  # smallest change of the monitored value that counts as an improvement
    monitor: str = "val_loss"  # val_loss (minimised) or a validation metric key such as f1_weighted (maximised)
    checkpoint_every_steps: int = 0  # periodic checkpoints inside an epoch (0 = off)
    checkpoint_every_epochs: int = 1  # complete checkpoints at the end of every N epochs
    keep_last_checkpoints: int = 2  # complete checkpoints kept (older ones are deleted after a newer one is complete)
    preemption_check_every_steps: int = 10  # optimizer steps between checks for a SLURM preemption notice
    max_failure_requeues: int = 3  # SLURM requeues of a run after a rank died or hung (preemptions not counted)


@dataclass
class LoggingConfig:
    run_name: str = ""  # empty = <timestamp>_<model_arch>
    output_dir: str = "checkpoints"  # parent of run directories
    wandb_mode: str = "offline"  # offline, online or disabled
    wandb_project: str = "csi_dist"  # W&B project, also the MLflow experiment
    wandb_group: str = ""  # W&B group (e.g. a sweep)
    mlflow: bool = False  # also track to MLflow (params, metrics per step, the run's files at the end)
    mlflow_tracking_uri: str = ""  # empty = a local file store in <run_dir>/mlflow; else a server (http://host:5000)


@dataclass
class HeatmapConfig:  # the seed's [HEATMAP] section and heatmap_* keys load here
    enabled: bool = False  # Grad-CAM zone maps of val images with the best weights when training ends (run/heatmaps)
    images: int = 1  # val images drawn, the first ones of the split (seed: heatmap_samples_per_epoch)
    every_epoch: bool = False  # also after every evaluation, with that epoch's weights (run/heatmaps/epoch_NNN)
    color_map: str = "jet"  # a matplotlib colormap name, or custom_purple_red (the seed's purple-to-red map)


@dataclass
class Config:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    heatmap: HeatmapConfig = field(default_factory=HeatmapConfig)


CUSTOM_PURPLE_RED = "custom_purple_red"  # the seed's heatmap colormap: purple, blue, green, yellow, red

SECTION_FIELDS = {f.name: f.type for f in dataclasses.fields(Config)}

# Keys of the seed project that live under a different name or section here: (section, key) -> (section, key).
# The seed flattened its INI sections, so its keys are accepted in any of its sections.
SEED_KEY_ALIASES: dict[str, tuple[str, str]] = {
    "early_stopping_patience": ("callbacks", "early_stopping_patience"),
    "scheduler_type": ("optimization", "scheduler"),
    "normalization_strategy": ("data", "normalization"),
    "excluded_file_ids": ("data", "excluded_file_ids"),
    "heatmap_enabled": ("heatmap", "enabled"),
    "heatmap_samples_per_epoch": ("heatmap", "images"),
    "heatmap_generate_per_epoch": ("heatmap", "every_epoch"),
    "heatmap_color_map": ("heatmap", "color_map"),
}
# Seed keys that still load but no longer do anything (the seed's zone-masking model and paths): warned, not errors.
SEED_IGNORED_KEYS = {
    "device", "load_data_to_memory", "labels_csv", "labels_csv_separator", "excluded_file_ids",
    "use_official_processor", "zone_focus_method", "use_segmentation_masking", "masking_strategy",
    "attention_strength", "image_format", "image_extension", "custom_mean", "custom_std",
}
IGNORED_SECTIONS = {"paths", "data_paths"}

CHOICES = {
    ("training", "mixed_precision"): ("auto", "bf16", "fp16", "no"),
    ("training", "strategy"): ("auto", *STRATEGY_REGISTRY),
    ("data", "normalization"): ("medical", "imagenet"),
    ("data", "gpu_augment"): ("auto", "true", "false"),
    ("optimization", "optimizer"): ("adam", "adamw", "sgd"),
    ("optimization", "fused_optimizer"): ("auto", "true", "false"),
    ("optimization", "scheduler"): ("reducelronplateau", "steplr", "cosine", "none"),
    ("logging", "wandb_mode"): ("offline", "online", "disabled"),
}


@dataclass(frozen=True)
class Range:
    """The values a numeric key accepts: [low, high], either end open or absent."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low, high = (f"{end:g}" if isinstance(end, float) else f"{end}" for end in (self.low, self.high))
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"{'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


# Every numeric key's accepted values; a value outside is an error naming the file, section and key.
RANGES: dict[tuple[str, str], Range] = {
    **{("training", key): Range(1) for key in ("batch_size", "n_epochs", "gradient_accumulation_steps",
                                               "log_every_steps", "eval_every_epochs", "collective_timeout_s")},
    **{("training", key): Range(0) for key in ("max_steps", "max_bad_steps", "global_batch_size", "profile_steps")},
    ("data", "num_workers"): Range(0),
    ("training", "seed"): Range(0, 2**63 - 1),  # torch seeds each rank with seed + 1 + rank, below 2**64
    ("training", "zero_stage"): Range(1, 3),
    ("data", "image_size"): Range(0),
    ("data", "shuffle_window"): Range(0),
    ("data", "max_bad_fraction"): Range(0, 1),
    ("model", "dropout_rate"): Range(0, 1, high_open=True),
    ("optimization", "learning_rate"): Range(0, low_open=True),
    **{("optimization", key): Range(0) for key in ("weight_decay", "patience", "warmup_epochs", "min_lr",
                                                   "grad_clip_norm")},
    ("optimization", "momentum"): Range(0, 1, high_open=True),
    ("optimization", "factor"): Range(0, 1, low_open=True, high_open=True),
    ("optimization", "step_size"): Range(1),
    ("optimization", "gamma"): Range(0, 1, low_open=True),
    ("loss", "unknown_weight"): Range(0),
    ("heatmap", "images"): Range(1),
    **{("callbacks", key): Range(0) for key in ("early_stopping_patience", "early_stopping_min_delta",
                                                "checkpoint_every_steps", "max_failure_requeues")},
    **{("callbacks", key): Range(1) for key in ("checkpoint_every_epochs", "keep_last_checkpoints",
                                                "preemption_check_every_steps")},
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
            try:
                return int(text)
            except ValueError:
                as_float = float(text)  # 1e3 is an int; inf, nan, 1e400 and 3.5 are not
            if not (math.isfinite(as_float) and as_float.is_integer()):
                raise ValueError(text)
            return int(as_float)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        return text.strip("\"'")
    except ValueError:
        expected = "a finite float" if kind is float else kind.__name__
        raise ConfigError(f"{where}: expected {expected}, got {raw!r}") from None


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


def load_run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The config a run trained with (its resolved_config.ini), for the commands that use a trained run (evaluate,
    predict, export): ConfigError naming the directory when it is no run directory, else naming file and key."""
    if not Path(run_dir).is_dir():
        raise ConfigError(f"--run-dir {run_dir}: no such run directory")
    return load_config(RunDir(run_dir).resolved_config, overrides)


def section_of(key: str) -> str:
    """The section that owns a bare key (for sweep results written as {"learning_rate": ...})."""
    for section in SECTION_FIELDS:
        if key.lower() in _field_types(section):
            return section
    raise ConfigError(f"unknown key {key!r}: expected one of the config keys, e.g. optimization.learning_rate")


def _set_value(config: Config, section: str, key: str, raw: str, where: str) -> None:
    kind = _field_types(section)[key]
    value = _parse_value(raw, kind, where)
    _check_value(section, key, value, where)
    setattr(getattr(config, section), key, value)


def _check_value(section: str, key: str, value: object, where: str) -> None:
    choices = CHOICES.get((section, key))
    if choices and str(value).lower() not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    accepted = RANGES.get((section, key))
    if accepted is not None and value not in accepted:
        raise ConfigError(f"{where}: {value!r} is out of range; {section}.{key} must be {accepted}")
    if (section, key) == ("callbacks", "monitor"):
        try:
            monitored_metric(str(value))
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    if (section, key) == ("heatmap", "color_map") and value not in ("jet", CUSTOM_PURPLE_RED):
        from matplotlib import colormaps  # only for a colormap other than the two known ones
        if value not in colormaps:
            close = difflib.get_close_matches(str(value), list(colormaps), n=1)
            raise ConfigError(f"{where}: {value!r} is not a matplotlib colormap (nor {CUSTOM_PURPLE_RED})"
                              + (f"; did you mean {close[0]!r}?" if close else ""))


def read_text_file(path: str | Path, what: str) -> str:
    """The text of a config or search-space file: UTF-8 (with or without a BOM; UTF-16 with its BOM), else cp1252
    with a warning naming the line, as the label CSV reader does. Anything else is a ConfigError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"{what} {path} cannot be read: {error.strerror or error}") from None
    encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as error:
        line, byte = raw.count(b"\n", 0, error.start) + 1, raw[error.start:error.start + 1]
    if encoding == "utf-16":
        raise ConfigError(f"{path}: line {line}: starts with a UTF-16 mark but is not UTF-16; re-save it as UTF-8")
    try:
        text = raw.decode(FALLBACK_ENCODING)
    except UnicodeDecodeError as error:
        line, byte = raw.count(b"\n", 0, error.start) + 1, raw[error.start:error.start + 1]
        raise ConfigError(f"{path}: line {line}: byte {byte!r} is neither UTF-8 nor {FALLBACK_ENCODING} "
                          f"(Windows); re-save the file as UTF-8") from None
    # Windows editors save the ANSI code page unless told otherwise; refusing would stop every accented comment.
    log.warning("%s: not valid UTF-8 (byte %r on line %d); read as %s, the Windows encoding. Re-save it as UTF-8 "
                "if a value looks wrong", path, byte, line, FALLBACK_ENCODING)
    return text


def ini_error(path: Path, error: configparser.Error) -> str:
    """A configparser error as one line naming the file, the line and what is wrong there."""
    if isinstance(error, configparser.DuplicateOptionError):
        return f"{path}: line {error.lineno}: key {error.option!r} appears twice in [{error.section}]; keep one"
    if isinstance(error, configparser.DuplicateSectionError):
        return f"{path}: line {error.lineno}: section [{error.section}] appears twice; merge them into one"
    if isinstance(error, configparser.MissingSectionHeaderError):
        return (f"{path}: line {error.lineno}: {error.line.strip()!r} comes before any section header; "
                f"put it under one, e.g. [Training]")
    if isinstance(error, configparser.ParsingError) and error.errors:
        lineno, line = error.errors[0]  # configparser keeps the line as its repr
        return (f"{path}: line {lineno}: cannot read {ast.literal_eval(line).strip()!r}; "
                f"expected key = value or [Section]")
    return f"{path}: not a valid INI file: {error}"


def read_ini(path: Path, parser: configparser.ConfigParser, what: str) -> None:
    """Fill `parser` from the INI file at `path`; a damaged or unreadable file is a ConfigError naming it."""
    try:
        parser.read_string(read_text_file(path, what), source=str(path))
    except configparser.Error as error:
        raise ConfigError(ini_error(path, error)) from None
    seen: dict[str, str] = {}
    for section_name in parser.sections():  # [Training] and [TRAINING] are one section to us: one must go
        if section_name.lower() in seen:
            raise ConfigError(f"{path}: section [{section_name}] appears twice (also as [{seen[section_name.lower()]}]"
                              f"); merge them into one")
        seen[section_name.lower()] = section_name


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from defaults, then the INI file (seed format accepted), then `section.key=value` overrides."""
    config = Config()
    if path is not None:
        path = Path(path)
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
        read_ini(path, parser, "config file")
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
    """Whole-config checks (each value was checked where it was set; these are the defaults and key pairs)."""
    for section in SECTION_FIELDS:
        for key, value in dataclasses.asdict(getattr(config, section)).items():
            _check_value(section, key, value, f"{section}.{key} (default)")
    if Path(config.logging.run_name).name != config.logging.run_name or config.logging.run_name in ("..", "."):
        raise ConfigError(f"logging.run_name {config.logging.run_name!r} must be a plain name, not a path")
    if config.training.global_batch_size and config.training.gradient_accumulation_steps != 1:
        raise ConfigError("training.global_batch_size and training.gradient_accumulation_steps are both set: with a "
                          "global batch the trainer picks the accumulation for the world size it finds; set one")


def _field_comments(section: str) -> dict[str, str]:
    """The comment after each field of a section's dataclass: the meaning shown by --help-config."""
    source = inspect.getsource(_section_type(section))
    return {match.group(1): match.group(2).strip()
            for match in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#(.*)$", source, flags=re.MULTILINE)}


def config_reference() -> str:
    """Every key with its type, default, accepted values and meaning, as a markdown table (from this module)."""
    lines = ["| key | type | default | accepts | meaning |", "|---|---|---|---|---|"]
    for section in SECTION_FIELDS:
        comments = _field_comments(section)
        defaults = dataclasses.asdict(_section_type(section)())
        for key, kind in _field_types(section).items():
            accepts = (", ".join(CHOICES[(section, key)]) if (section, key) in CHOICES
                       else str(RANGES[(section, key)]) if (section, key) in RANGES
                       else "val_loss or a validation metric" if (section, key) == ("callbacks", "monitor")
                       else "")
            lines.append(f"| {section}.{key} | {kind.__name__} | {defaults[key]!r} | {accepts} | "
                         f"{comments.get(key, '')} |")
    return "\n".join(lines)


def config_to_dict(config: Config) -> dict[str, dict[str, object]]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as INI (loadable by load_config). Keys come from the environment; a value that
    holds one anyway (e.g. a token pasted into an override) is written masked."""
    parser = configparser.ConfigParser(interpolation=None)
    for section, values in config_to_dict(config).items():
        parser[section.capitalize()] = {key: redact(str(value)) for key, value in values.items()}
    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            parser.write(handle)
    atomic_write(Path(path), write)
