"""Bad config values and bad config files (issue 30): each is a ConfigError naming the file and the key (and the line,
where the INI parser knows it); each command turns one into exit 2 with that message and no traceback.

The values and files are tried on load_config itself (fast, no process); one test per command (train, evaluate,
predict, sweep) shows the exit status and the message a user gets. The search-space file's own cases are in
tests/test_sweep.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env
from csi_dist.core.config import ConfigError, load_config
from csi_dist.evaluate import main as evaluate_main
from csi_dist.predict import main as predict_main

# (section, key, value, what the message says): the key is an int, float or bool key in each case
BAD_VALUES = [
    ("Training", "batch_size", "inf", "expected int, got 'inf'"),
    ("Training", "n_epochs", "1e400", "expected int, got '1e400'"),
    ("Training", "num_workers", "-inf", "expected int, got '-inf'"),
    ("Training", "seed", "nan", "expected int, got 'nan'"),
    ("Callbacks", "keep_last_checkpoints", "3.5", "expected int, got '3.5'"),
    ("Training", "seed", "99999999999999999999",  # torch.manual_seed refused it mid-start with a traceback
     "99999999999999999999 is out of range; training.seed must be [0, 9223372036854775807]"),
    ("Training", "deterministic", "yes please", "expected bool, got 'yes please'"),
    ("Optimization", "learning_rate", "nan", "expected a finite float, got 'nan'"),
    ("Optimization", "learning_rate", "1e400", "expected a finite float, got '1e400'"),
    ("Optimization", "grad_clip_norm", "-inf", "expected a finite float, got '-inf'"),
]


def config_file(tmp_path: Path, text: str | bytes, name: str = "bad.ini") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(("section", "key", "value", "expected"), BAD_VALUES)
def test_a_bad_value_in_a_file_names_the_file_section_and_key(tmp_path: Path, section, key, value, expected):
    path = config_file(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == f"{path} [{section}] {key}: {expected}"


@pytest.mark.parametrize(("section", "key", "value", "expected"), BAD_VALUES)
def test_a_bad_value_in_an_override_names_the_override(section, key, value, expected):
    override = f"{section.lower()}.{key}={value}"
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value) == f"override {override!r}: {expected}"


def test_whole_numbers_written_as_floats_still_load_for_integer_keys(tmp_path: Path):
    text = "[Training]\nbatch_size = 1e1\nn_epochs = 4.0\nseed = 12345678901234567\n"
    config = load_config(config_file(tmp_path, text))
    # the seed above is not exactly a float: read as an integer, not rounded through one
    assert (config.training.batch_size, config.training.n_epochs, config.training.seed) == (10, 4, 12345678901234567)


# (file content, the start of the message after the path): configparser knows the line of each of these
BAD_FILES = {
    "duplicate key": ("[Training]\nbatch_size = 4\nn_epochs = 2\nbatch_size = 8\n",
                      "line 4: key 'batch_size' appears twice in [Training]"),
    "duplicate section": ("[Training]\nbatch_size = 4\n\n[Model]\ndropout_rate = 0.1\n[Training]\nn_epochs = 2\n",
                          "line 6: section [Training] appears twice"),
    "duplicate section in another case": ("[Training]\nbatch_size = 4\n[TRAINING]\nn_epochs = 2\n",
                                          "section [TRAINING] appears twice (also as [Training])"),
    "no section header": ("batch_size = 4\n[Training]\nn_epochs = 2\n",
                          "line 1: 'batch_size = 4' comes before any section header"),
    "a line that is no key = value": ("[Training]\nbatch_size = 4\nn_epochs\n",
                                      "line 3: cannot read 'n_epochs'; expected key = value or [Section]"),
    "bytes neither UTF-8 nor cp1252": (b"[Logging]\nrun_name = run\n# \x81\x8d\n",
                                       "line 3: byte b'\\x81' is neither UTF-8 nor cp1252"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_damaged_config_file_names_the_file_and_line(tmp_path: Path, case: str):
    text, expected = BAD_FILES[case]
    path = config_file(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value).startswith(f"{path}: {expected}"), str(error.value)


def test_a_missing_file_a_directory_and_an_unreadable_file_are_named(tmp_path: Path, monkeypatch):
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "absent.ini")
    assert str(missing.value) == f"config file not found: {tmp_path / 'absent.ini'}"
    with pytest.raises(ConfigError) as directory:
        load_config(tmp_path)
    assert str(directory.value) == f"config file {tmp_path} is a directory, not a file"
    unreadable = config_file(tmp_path, "[Training]\nbatch_size = 4\n")
    unreadable.chmod(0)
    if os.geteuid() == 0:  # root reads a mode-000 file: refuse it the way the kernel refuses anyone else
        read_bytes = Path.read_bytes

        def refuse(path: Path) -> bytes:
            if path == unreadable:
                raise PermissionError(13, "Permission denied", str(path))
            return read_bytes(path)
        monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as refused:
        load_config(unreadable)  # configparser.read() skipped such a file in silence: the defaults trained
    assert str(refused.value) == f"config file {unreadable} cannot be read: Permission denied"


def test_windows_encoded_files_are_read_with_a_warning_naming_the_line(tmp_path: Path, caplog):
    text = "[Data]\n# Größe: the seed's phantom shards\nshard_dir = données/shards\n"
    cp1252 = load_config(config_file(tmp_path, text.encode("cp1252"), "cp1252.ini"))
    assert cp1252.data.shard_dir == "données/shards"
    assert f"{tmp_path / 'cp1252.ini'}: not valid UTF-8 (byte b'\\xf6' on line 2); read as cp1252" in caplog.text
    caplog.clear()
    for name, encoded in (("bom.ini", text.encode("utf-8-sig")), ("utf16.ini", text.encode("utf-16"))):
        assert load_config(config_file(tmp_path, encoded, name)).data.shard_dir == "données/shards"  # Notepad's
    assert "not valid UTF-8" not in caplog.text


# ------------------------------------------------------------------------------------------------ the commands
def run_command(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], env=subprocess_env(), cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in named:
        assert text in result.stderr, result.stderr[-3000:]


def test_train_refuses_an_infinite_integer_with_exit_2(tmp_path: Path):
    path = config_file(tmp_path, "[Training]\nbatch_size = inf\n")
    assert_refused(run_command("csi_dist.train", "--config", str(path)),
                   f"{path} [Training] batch_size: expected int, got 'inf'")


# evaluate and predict load torch, scikit-learn and pandas before main() runs (5 s of CPU each as a process): their
# main() is what `python -m` runs (run_command: sys.exit(main())), so it is called here, where those are loaded anyway.
def test_evaluate_refuses_a_damaged_resolved_config_with_exit_2(tmp_path: Path, caplog):
    config_file(tmp_path, "[Training]\nn_epochs = 1e400\n", "resolved_config.ini")
    assert evaluate_main(["--run-dir", str(tmp_path)]) == 2  # an exception escaping main() would be the traceback
    assert f"{tmp_path / 'resolved_config.ini'} [Training] n_epochs: expected int, got '1e400'" in caplog.text


def test_predict_refuses_a_damaged_resolved_config_with_exit_2(tmp_path: Path, caplog):
    config_file(tmp_path, "[Training]\nbatch_size = 4\nbatch_size = 8\n", "resolved_config.ini")
    (tmp_path / "images").mkdir()
    assert predict_main(["--run-dir", str(tmp_path), "--images", str(tmp_path / "images"),
                         "--out", str(tmp_path / "predictions.csv")]) == 2
    assert f"{tmp_path / 'resolved_config.ini'}: line 3: key 'batch_size' appears twice in [Training]" in caplog.text


def test_sweep_refuses_an_infinite_bound_in_its_space_file_with_exit_2(tmp_path: Path):
    space = config_file(tmp_path, "params:\n  training.batch_size: {type: int, low: 1, high: .inf}\n", "space.yaml")
    assert_refused(run_command("csi_dist.sweep", "--space", str(space), "--executor", "local",
                               "--sweep-dir", str(tmp_path / "sweep")),
                   f"{space}: parameter 'training.batch_size': high must be a finite number, got inf")
