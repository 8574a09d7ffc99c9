"""The strategy contract (issue 33): every registered strategy meets strategies.Strategy, the config offers exactly
the registered ones, convert and the trainer find them through the registry. No training here: the strategies'
behaviour is tests/test_strategies.py, test_parity.py and test_elastic.py."""
from __future__ import annotations

import inspect

import pytest

from csi_dist.core.config import ConfigError, load_config
from csi_dist.training.strategies import Strategy
from csi_dist.core.strategy_registry import REGISTRY, STRATEGY_STATE_DIR, checkpoint_format, resolve_strategy

CONTRACT_METHODS = sorted(name for name, member in vars(Strategy).items()
                          if callable(member) or isinstance(member, staticmethod)
                          if not name.startswith("_") or name == "__init__")
CONTRACT_ATTRIBUTES = sorted(Strategy.__annotations__)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_strategy_meets_the_contract(name: str):
    strategy_class = REGISTRY[name].strategy_class()
    assert strategy_class.name == name
    missing = [member for member in [*CONTRACT_METHODS, *CONTRACT_ATTRIBUTES] if not hasattr(strategy_class, member)
               and member != "precision"]  # precision is the accelerator's, set per instance
    assert missing == []
    for method in CONTRACT_METHODS:  # the same parameters the trainer and convert pass
        wanted = list(inspect.signature(getattr(Strategy, method)).parameters)
        assert list(inspect.signature(getattr(strategy_class, method)).parameters) == wanted, method
    assert isinstance(strategy_class.min_processes, int) and strategy_class.min_processes >= 1
    assert CONTRACT_METHODS and len(CONTRACT_ATTRIBUTES) >= 6  # the walk found the contract


def test_the_config_offers_exactly_the_registered_strategies():
    for name in REGISTRY:
        assert load_config(None, [f"training.strategy={name}"]).training.strategy == name
    with pytest.raises(ConfigError, match="ddp, fsdp2, deepspeed"):
        load_config(None, ["training.strategy=horovod"])


def test_the_launchers_environment_picks_the_strategy(monkeypatch):
    assert resolve_strategy("auto") == "ddp" and resolve_strategy("fsdp2") == "fsdp2"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` exports for a ZeRO yaml
    assert resolve_strategy("ddp") == "deepspeed"


def test_convert_finds_a_checkpoints_strategy_by_its_format(tmp_path):
    dcp, zero, empty = tmp_path / "dcp" / STRATEGY_STATE_DIR, tmp_path / "zero" / STRATEGY_STATE_DIR, tmp_path / "x"
    for directory in (dcp, zero, empty):
        directory.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"")
    (zero / "latest").write_text("zero")
    assert checkpoint_format(dcp).name == "ddp" and checkpoint_format(dcp).needs_model_template
    assert checkpoint_format(zero).name == "deepspeed" and not checkpoint_format(zero).needs_model_template
    assert checkpoint_format(empty) is None
