"""Search-space files of a sweep (YAML or INI): parameters, objective, sampler and pruner; also their W&B-sweep form.

A space file names config keys as ``section.key`` and says how to sample each one (YAML shown; the INI form has a
``[study]``, ``[sampler]`` and ``[pruner]`` section and one ``[param section.key]`` section per parameter, with
list values written ``a, b, c`` and conditions ``when = optimization.optimizer: adamw, sgd``)::

    study:   {objective: f1_weighted, direction: auto}   # val_<objective> of the trainer's history; auto = its mode
    sampler: {name: tpe, seed: 42, n_startup_trials: 10, multivariate: true, group: true, constant_liar: true}
    pruner:  {name: median, n_startup_trials: 5, n_warmup_steps: 2}   # or hyperband / successive_halving / none
    params:
      optimization.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-1, log: true}
      training.batch_size:        {choices: [16, 32, 64, 128]}
      optimization.momentum:      {type: float, low: 0.5, high: 0.99, when: {optimization.optimizer: [sgd]},
                                   otherwise: 0.9}

A parameter with ``when`` is sampled only when the named, earlier parameters have one of the listed values; if not,
``otherwise`` (when given) is applied as a fixed value, so a trial's applied overrides always describe its run
completely (e.g. Adam trains with weight_decay 0, as in the seed project, instead of the base config's value).

Seeding: every trial gets a sampler seeded with ``seed + trial number``. A single fixed seed would make each worker
process draw the same "random" start-up points (each process restarts the generator), which duplicates trials in
a parallel sweep; seeding by trial number keeps a sweep reproducible whichever process asks for which trial.
"""
from __future__ import annotations

import configparser
import logging
import math
from dataclasses import dataclass, field
import typing
from pathlib import Path

import optuna

from csi_dist.core.config import ConfigError, load_config, read_ini, read_text_file
from csi_dist.core.domain import metric_direction, monitored_metric

log = logging.getLogger(__name__)

PARAM_TYPES = ("float", "int", "categorical")
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "successive_halving", "none")


@dataclass
class Parameter:
    name: str  # section.key
    kind: str  # float, int or categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None
    when: dict[str, list] = field(default_factory=dict)
    otherwise: object = None

    def describe(self) -> str:
        """The parameter's range in words, e.g. ``0.1 .. 1 (log scale)`` or ``one of adam, sgd``."""
        if self.kind == "categorical":
            text = "one of " + ", ".join(str(choice) for choice in self.choices)
        else:
            text = f"{self.kind} {self.low:g} .. {self.high:g}"
            text += f" in steps of {self.step:g}" if self.step else ""
            text += " (log scale)" if self.log else ""
        if self.when:
            text += "; only when " + " and ".join(f"{key} is {' or '.join(map(str, values))}"
                                                  for key, values in self.when.items())
            text += f", else {self.otherwise}" if self.otherwise is not None else ""
        return text

    def suggest(self, trial: optuna.Trial) -> object:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass
class SearchSpace:
    path: Path
    params: list[Parameter]
    objective: str = "f1_weighted"
    direction: str = "auto"
    sampler_settings: dict = field(default_factory=dict)
    pruner_settings: dict = field(default_factory=dict)

    @property
    def history_key(self) -> str:
        """Key of the objective in the trainer's per-epoch history record."""
        return f"val_{self.objective}"

    def study_direction(self) -> str:
        if self.direction != "auto":
            return self.direction
        return "minimize" if metric_direction(self.objective) == "min" else "maximize"

    def suggest(self, trial: optuna.Trial) -> dict[str, object]:
        """Sample the trial's parameters; returns every override it applies (sampled and `otherwise` values)."""
        applied: dict[str, object] = {}
        for parameter in self.params:
            if all(applied.get(key) in values for key, values in parameter.when.items()):
                applied[parameter.name] = parameter.suggest(trial)
            elif parameter.otherwise is not None:
                applied[parameter.name] = parameter.otherwise
        return applied

    def sampler(self, trial_number: int) -> optuna.samplers.BaseSampler:
        settings = dict(self.sampler_settings)
        name = str(settings.pop("name", "tpe")).lower()
        seed = int(settings.pop("seed", 42)) + trial_number
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, **settings)

    def pruner(self, n_epochs: int) -> optuna.pruners.BasePruner:
        settings = dict(self.pruner_settings)
        name = str(settings.pop("name", "median")).lower()
        if name == "median":
            return optuna.pruners.MedianPruner(**settings)
        if name == "hyperband":
            settings.setdefault("max_resource", n_epochs)  # one step = one epoch's evaluation
            return optuna.pruners.HyperbandPruner(**settings)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**settings)
        return optuna.pruners.NopPruner()

    def check_against_config(self, config_path: Path | None, overrides: list[str]) -> None:
        """Every parameter must be a config key with a valid value, and none may also be fixed with --set."""
        fixed = {override.split("=", 1)[0].strip().lower() for override in overrides}
        clash = sorted(fixed & {p.name.lower() for p in self.params})
        if clash:
            raise ConfigError(f"{self.path}: {', '.join(clash)} is both searched and fixed with --set; drop one")
        load_config(config_path, overrides)  # the base config's own mistakes are named as such, not as the space's
        for parameter in self.params:
            for value in parameter.choices or [parameter.low, parameter.high, parameter.otherwise]:
                if value is not None:
                    try:
                        load_config(config_path, [*overrides, f"{parameter.name}={value}"])
                    except ConfigError as error:
                        raise ConfigError(f"{self.path}: parameter {parameter.name!r} takes {value!r}, which the "
                                          f"config refuses: {error}") from None


def _parse_scalar(text: str) -> object:
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip("\"'")


def _mapping(value: object, where: str) -> dict:
    """A section of the space file as a dict (absent = empty); anything but a mapping is named."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (key: value), got {value!r}")
    return dict(value)


def _number(value: object, where: str, integer: bool = False) -> float | int:
    """A finite number (an integer for an int parameter); YAML reads 1e-5, without a dot, as text: accepted."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if integer and not float(number).is_integer():
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    return int(number) if integer else number


def _scalar(value: object, where: str) -> object:
    """A value a config key can take: text, a boolean or a finite number."""
    if isinstance(value, (str, bool)):
        return value
    if isinstance(value, (int, float)):
        return _number(value, where)
    raise ConfigError(f"{where} must be a single value (text, number or true/false), got {value!r}")


def _parse_param(name: str, spec: object, where: str) -> Parameter:
    if not isinstance(name, str) or "." not in name:
        raise ConfigError(f"{where}: parameter {name!r} must be written section.key, e.g. optimization.learning_rate")
    where = f"{where}: parameter {name!r}"
    spec = _mapping(spec, where)
    kind = str(spec.pop("type", "categorical" if "choices" in spec else "")).lower()
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(PARAM_TYPES)} "
                          f"(or give choices), got {kind or 'nothing'!r}")
    when = spec.pop("when", None) or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{where}: when must map section.key to a list of values")
    log = spec.pop("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log must be true or false, got {log!r}")
    bounds = {key: spec.pop(key, None) for key in ("low", "high", "step")}
    bounds = {key: None if value is None else _number(value, f"{where}: {key}", integer=kind == "int")
              for key, value in bounds.items()}
    choices = spec.pop("choices", None)
    if choices is not None and not isinstance(choices, list):
        raise ConfigError(f"{where}: choices must be a list, e.g. [16, 32, 64], got {choices!r}")
    otherwise = spec.pop("otherwise", None)
    parameter = Parameter(name=name, kind=kind, log=log, low=bounds["low"], high=bounds["high"], step=bounds["step"],
                          when={str(key): [_scalar(v, f"{where}: when {key}") for v in
                                           (values if isinstance(values, list) else [values])]
                                for key, values in when.items()},
                          otherwise=None if otherwise is None else _scalar(otherwise, f"{where}: otherwise"),
                          choices=None if choices is None else [_scalar(c, f"{where}: choices") for c in choices])
    if spec:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(map(str, spec)))}")
    if kind == "categorical" and not parameter.choices:
        raise ConfigError(f"{where}: categorical needs a non-empty choices list")
    if kind != "categorical" and (parameter.low is None or parameter.high is None or parameter.low > parameter.high):
        raise ConfigError(f"{where}: {kind} needs low <= high")
    if kind != "categorical" and parameter.step is not None and parameter.step <= 0:
        raise ConfigError(f"{where}: step must be > 0, got {parameter.step!r}")
    if parameter.log and (parameter.step is not None or parameter.low <= 0):
        raise ConfigError(f"{where}: log needs low > 0 and no step")
    return parameter


def _read_yaml(path: Path) -> dict:
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load, except that a key written twice is an error instead of the last one silently winning."""
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, typing.Hashable):
                    continue  # PyYAML names an unhashable key itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    try:
        data = yaml.load(read_text_file(path, "search-space file"), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        if mark is None:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        raise ConfigError(f"{path}: line {mark.line + 1}, column {mark.column + 1}: not valid YAML: "
                          f"{error.problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with study, sampler, pruner and params")
    return data


def _read_ini(path: Path) -> dict:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    parser.optionxform = str  # keys are config keys (section.key), keep them as written
    read_ini(path, parser, "search-space file")
    data: dict = {"params": {}}
    for section in parser.sections():
        items = dict(parser.items(section))
        if section.lower() in ("study", "sampler", "pruner"):
            data[section.lower()] = {key: _parse_scalar(value) for key, value in items.items()}
        elif section.lower().startswith("param "):
            spec: dict = {}
            for key, value in items.items():
                if key == "choices":
                    spec[key] = [_parse_scalar(v) for v in value.split(",")]
                elif key == "when":
                    target, _, values = value.partition(":")
                    spec[key] = {target.strip(): [_parse_scalar(v) for v in values.split(",")]}
                else:
                    spec[key] = _parse_scalar(value)
            data["params"][section[6:].strip()] = spec
        else:
            raise ConfigError(f"{path}: unknown section [{section}]; expected [study], [sampler], [pruner] "
                              f"or [param section.key]")
    return data


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    data = _read_yaml(path) if path.suffix.lower() in (".yaml", ".yml") else _read_ini(path)
    unknown = set(data) - {"study", "sampler", "pruner", "params"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(sorted(map(str, unknown)))}")
    study = _mapping(data.get("study"), f"{path}: study")
    try:
        objective = monitored_metric(str(study.pop("objective", "f1_weighted")))
    except ValueError as error:
        raise ConfigError(f"{path}: study.objective: {error}") from None
    direction = str(study.pop("direction", "auto")).lower()
    if study:
        raise ConfigError(f"{path}: study: unknown key(s) {', '.join(sorted(study))} (objective, direction)")
    if direction not in ("auto", "maximize", "minimize"):
        raise ConfigError(f"{path}: study.direction must be auto, maximize or minimize, got {direction!r}")
    sampler, pruner = _mapping(data.get("sampler"), f"{path}: sampler"), _mapping(data.get("pruner"), f"{path}: pruner")
    if str(sampler.get("name", "tpe")).lower() not in SAMPLERS:
        raise ConfigError(f"{path}: sampler.name must be one of {', '.join(SAMPLERS)}")
    if str(pruner.get("name", "median")).lower() not in PRUNERS:
        raise ConfigError(f"{path}: pruner.name must be one of {', '.join(PRUNERS)}")
    for part, settings in (("sampler", sampler), ("pruner", pruner)):
        for key, value in settings.items():
            _scalar(value, f"{path}: {part}.{key}")
    if "seed" in sampler:
        _number(sampler["seed"], f"{path}: sampler.seed", integer=True)
    params_spec = _mapping(data.get("params"), f"{path}: params")
    if not params_spec:
        raise ConfigError(f"{path}: no parameters to search (params is empty)")
    params = [_parse_param(name, spec or {}, str(path)) for name, spec in params_spec.items()]
    seen: set[str] = set()
    for parameter in params:
        missing = [key for key in parameter.when if key not in seen]
        if missing:
            raise ConfigError(f"{path}: parameter {parameter.name!r}: when refers to {', '.join(missing)}, "
                              f"which must be a parameter listed before it")
        seen.add(parameter.name)
    space = SearchSpace(path=path, params=params, objective=objective, direction=direction,
                        sampler_settings=sampler, pruner_settings=pruner)
    for part, build in (("sampler", lambda: space.sampler(0)), ("pruner", lambda: space.pruner(1))):
        try:  # fail now, naming the file, on settings optuna refuses
            build()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"{path}: {part}: {error}") from None
    return space


def wandb_sweep(space: SearchSpace, config_path: Path | None, overrides: list[str], n_trials: int) -> dict:
    """The same search as a W&B sweep definition (bayes + hyperband), for users who prefer `wandb agent`.

    W&B has no conditional parameters: every parameter is sampled, and csi_dist.tuning.wandb_agent applies the space
    file's `when`/`otherwise` rules before training, so a W&B trial trains exactly what an Optuna trial would.
    """
    parameters: dict[str, dict] = {}
    for p in space.params:
        if p.kind == "categorical":
            parameters[p.name] = {"values": list(p.choices)}
        elif p.kind == "int":
            parameters[p.name] = {"distribution": "int_uniform", "min": int(p.low), "max": int(p.high)}
        else:
            parameters[p.name] = {"distribution": "log_uniform_values" if p.log else "uniform",
                                  "min": float(p.low), "max": float(p.high)}
    command = ["${env}", "${interpreter}", "-m", "csi_dist.tuning.wandb_agent", "--space", str(space.path.resolve())]
    if config_path is not None:
        command += ["--config", str(Path(config_path).resolve())]
    for override in overrides:
        command += ["--set", override]
    command.append("${args}")
    definition = {
        "program": "csi_dist/tuning/wandb_agent.py",
        "command": command,
        "method": "bayes",
        "run_cap": n_trials,
        "metric": {"name": f"val/{space.objective}", "goal": space.study_direction()},
        "parameters": parameters,
    }
    if str(space.pruner_settings.get("name", "median")).lower() != "none":
        definition["early_terminate"] = {"type": "hyperband", "min_iter": 1, "eta": 3}
    return definition
