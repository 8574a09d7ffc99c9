"""Fault injection against the finished pipeline: kill -9, lost ranks, bad inputs and crafted files, for real.

Every fault here is real: SIGKILL/SIGSTOP sent with os.kill to real trainer processes, damaged or crafted files on
disk. Each test checks what a user would see: an exit code, a message, a complete checkpoint, identical weights.

Runtime faults injected here: 7 SIGKILLs of a whole 2-process training (launcher and both ranks) at random steps,
some of them while a checkpoint is being written; a SIGKILL and a SIGSTOP of one rank; a NaN image in a forward pass
and 4 non-finite losses (2 steps skipped and counted, BatchNorm buffers checked, then 3 that stop a run allowed 2).
The SIGKILL of one rank of a 2-node SLURM job, which uses this file's reference run, is in
tests/test_slurm_faults.py.

BAD_INPUTS lists every bad input of the reliability list, here or in another test module, with the assertion that
tries it, so the README's count is a count of distinct cases.
"""
from __future__ import annotations

import ast
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import REPO_ROOT, built_once, free_port, subprocess_env, torchrun_command
from csi_dist.training.checkpoint_files import (SCHEDULE_FILE, STATE_FILE, STRATEGY_STATE_DIR, complete_checkpoints,
                                                latest_checkpoint)
from csi_dist.convert import full_weights
from csi_dist.data.labels import LabelError, read_label_csv
from csi_dist.data.shards.reader import LoaderSettings, ShardError, build_loader, open_split
from csi_dist.data.shards.writer import write_demo
from data_helpers import Payload, label_row, write_csv
from slurm_helpers import differing_tensors
from shard_factory import write_shards

# Every bad input tried, each a distinct case with an assertion of its own: input -> ("module::test[parameter]",
# a piece of that assertion's text). A test may try several inputs only where each has its own `assert` (or
# `pytest.raises`) line, or is its own parameter of a parametrized test (then [parameter] is a text of that
# parameter's entry in the decorator). test_the_bad_input_table_points_at_assertions_that_exist checks each row and
# that the README's count is the number of rows.
BAD_INPUTS = {
    # shards
    "undecodable image bytes inside a shard (counted skip)":
        ("test_reader.py::test_corrupt_image_is_a_counted_skip_that_keeps_the_step_count", "failed == [4]"),
    "truncated tar shard": ("test_reader.py::test_missing_and_truncated_shards_are_named", "has 1000 bytes"),
    "missing shard file": ("test_reader.py::test_missing_and_truncated_shards_are_named", "missing: .*shard-000001"),
    "shard directory without manifest.json":
        ("test_reader.py::test_missing_and_truncated_shards_are_named", "no manifest.json"),
    "missing shard directory": ("test_train.py::test_missing_shards_exit_2_with_the_fix", "csi-shards --demo"),
    "shard modified in place (csi-shards verify)":
        ("test_shard_writer.py::test_verify_reports_modified_shard_and_names_the_damaged_sample",
         "modified: sha256 differs from the manifest"),
    "truncated JPEG inside a shard (counted skip)":
        ("test_faults.py::test_truncated_jpeg_and_out_of_range_label_inside_a_shard_are_counted_skips",
         "DecodeError: .*truncated"),
    "zone label out of range inside a shard (counted skip)":
        ("test_faults.py::test_truncated_jpeg_and_out_of_range_label_inside_a_shard_are_counted_skips",
         r"zones \[0, 1, 7, 0, 0, 0\] are not"),
    "duplicate sample key inside a shard":
        ("test_faults.py::test_duplicate_key_inside_a_shard_is_named_and_its_samples_counted",
         "holds 3 samples, the manifest says 4"),
    "random bytes over 3 samples of a shard (only those 3 skipped)":
        ("test_faults.py::test_corrupt_bytes_inside_a_shard_cost_only_the_samples_they_hit", "failed == [2, 5, 7]"),
    "shard with no samples": ("test_faults.py::test_empty_shards_and_an_empty_train_split",
                              "steps == 2 and failed == []"),
    "empty (0-byte) shard file": ("test_faults.py::test_empty_shards_and_an_empty_train_split", "has 0 bytes"),
    "empty train split": ("test_faults.py::test_empty_shards_and_an_empty_train_split", "the train split is empty"),
    "train shard of random bytes (the run stops, exit 5)":
        ("test_outcomes.py::test_unreadable_train_data_stops_the_run_and_padding_copies_are_not_failures",
         "24 of the 24 train samples in"),
    "corrupt val image repeated by the padding (counted once)":
        ("test_outcomes.py::test_unreadable_train_data_stops_the_run_and_padding_copies_are_not_failures",
         "== [(0, 1)]"),
    "empty val split (warned, named in the outcome)":
        ("test_outcomes.py::test_eval_every_epochs_an_empty_val_split_and_strict_history", "the val split is EMPTY"),
    # the label CSV and the source images
    "zone grade out of range in the CSV (5, -1)":
        ("test_labels.py::test_bad_zone_value_names_file_line_column_value[\"-1\"]", '"left_mid" in message'),
    "zone grade that is no whole number in the CSV (2.5)":
        ("test_labels.py::test_bad_zone_value_names_file_line_column_value[\"2.5\"]", '"left_mid" in message'),
    "zone grade that is no number in the CSV (abc)":
        ("test_labels.py::test_bad_zone_value_names_file_line_column_value[\"abc\"]", '"left_mid" in message'),
    "inf grade in the CSV": ("test_faults.py::test_infinite_values_in_the_csv_are_named[inf-grade]", "line 3, column"),
    "-inf csi in the CSV": ("test_faults.py::test_infinite_values_in_the_csv_are_named[minus-inf-csi]",
                            "line 3, column"),
    "NaN / empty grade in the CSV (= unknown class, csi recomputed)":
        ("test_labels.py::test_reads_users_format_with_codings", "[2, UNKNOWN_CLASS, UNKNOWN_CLASS, 1, 1, 1]"),
    "csi that is no number in the CSV": ("test_labels.py::test_bad_csi_value_is_an_error", "line 2, column csi"),
    "ahf value that is not 0 or 1 in the CSV": ("test_labels.py::test_bad_ahf_value_is_an_error", "line 2, column ahf"),
    "duplicate FileID in the CSV": ("test_labels.py::test_duplicate_file_id_names_both_lines", "lines 2 and 4"),
    "missing CSV column": ("test_labels.py::test_missing_column_names_file_missing_and_found_columns",
                           '"right_sup" in message'),
    "wrong CSV separator": ("test_labels.py::test_comma_separated_header_suggests_separator", "comma|','"),
    "label CSV saved as cp1252 by Excel (read, with a warning)":
        ("test_labels.py::test_cp1252_csv_is_read_with_a_warning_naming_file_and_encoding", '"cp1252" in caplog.text'),
    "label CSV in neither utf-8 nor cp1252":
        ("test_labels.py::test_file_neither_utf8_nor_cp1252_is_a_label_error", '"cp1252" in message'),
    "a forced encoding that cannot decode the CSV":
        ("test_labels.py::test_forced_encoding_that_cannot_decode_names_file_encoding_and_line",
         "repr(encoding) in message"),
    "FileIDs that look like numbers (20200101.00, 00123)":
        ("test_labels.py::test_file_ids_and_patient_ids_are_read_exactly_as_written", "== file_ids"),
    "corrupt source image": ("test_shard_writer.py::test_missing_and_corrupt_images_are_skipped_and_listed",
                             '"CorruptImageError" in skipped'),
    "missing source image": ("test_shard_writer.py::test_missing_and_corrupt_images_are_skipped_and_listed",
                             '"MissingImageError" in skipped'),
    "plain 2-D NIfTI (oriented from its affine)":
        ("test_images.py::test_nifti_orientation_puts_patient_right_superior_top_left", "np.unravel_index"),
    "NIfTI volume": ("test_images.py::test_nifti_volume_is_refused_by_name", r"vol\.nii\.gz"),
    "PALETTE COLOR DICOM (through its palette)":
        ("test_images.py::test_dicom_palette_color_is_converted_through_its_palette", "PALETTE_GREYS * 2"),
    "PALETTE COLOR DICOM without a palette":
        ("test_images.py::test_dicom_palette_color_without_palette_is_refused_by_name", r"nolut\.dcm"),
    "constant 16-bit image": ("test_images.py::test_constant_image_is_mid_grey_not_black", "== [128]"),
    # configs and the command line
    "config key typo": ("test_config.py::test_unknown_key_names_the_closest_valid_key", "unknown key 'bach_size'"),
    "config value of the wrong type": ("test_config.py::test_wrong_type_and_bad_choice_are_named",
                                       "expected int, got 'many'"),
    "config value that is not a choice": ("test_config.py::test_wrong_type_and_bad_choice_are_named",
                                          "'rmsprop' is not one of"),
    "config value out of range":
        ("test_config.py::test_out_of_range_settings_are_named_with_file_section_and_key[checkpoint_every_epochs]",
         "expected in str(error.value)"),
    "non-finite config float":
        ("test_config.py::test_out_of_range_settings_are_named_with_file_section_and_key[unknown_weight]",
         "expected in str(error.value)"),
    "a monitor that is no metric":
        ("test_config.py::test_out_of_range_settings_are_named_with_file_section_and_key[csi_pearson_rr]",
         "expected in str(error.value)"),
    "an integer key set to inf": ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key"
                                  '["batch_size", "inf"]', "str(error.value) =="),
    "an integer key set to 1e400": ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key"
                                    '["n_epochs", "1e400"]', "str(error.value) =="),
    "an integer key set to nan": ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key"
                                  '["seed", "nan"]', "str(error.value) =="),
    "an integer key set to a fraction (3.5)":
        ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key[\"3.5\"]",
         "str(error.value) =="),
    "a seed beyond 64 bits": ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key"
                              '["99999999999999999999"]', "str(error.value) =="),
    "a boolean key set to 'yes please'":
        ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key[\"yes please\"]",
         "str(error.value) =="),
    "a float key set to 1e400": ("test_bad_config.py::test_a_bad_value_in_a_file_names_the_file_section_and_key"
                                 '["learning_rate", "1e400"]', "str(error.value) =="),
    "a config file with a duplicate key":
        ("test_bad_config.py::test_a_damaged_config_file_names_the_file_and_line[\"duplicate key\"]",
         "str(error.value).startswith"),
    "a config file with a duplicate section":
        ("test_bad_config.py::test_a_damaged_config_file_names_the_file_and_line[\"duplicate section\":]",
         "str(error.value).startswith"),
    "a config file with a section repeated in another case":
        ("test_bad_config.py::test_a_damaged_config_file_names_the_file_and_line[in another case]",
         "str(error.value).startswith"),
    "a config file without a section header":
        ("test_bad_config.py::test_a_damaged_config_file_names_the_file_and_line[no section header]",
         "str(error.value).startswith"),
    "a config line that is no key = value":
        ("test_bad_config.py::test_a_damaged_config_file_names_the_file_and_line[no key = value]",
         "str(error.value).startswith"),
    "a config file in neither UTF-8 nor cp1252":
        ("test_bad_config.py::test_a_damaged_config_file_names_the_file_and_line[neither UTF-8 nor cp1252]",
         "str(error.value).startswith"),
    "a config file that does not exist":
        ("test_bad_config.py::test_a_missing_file_a_directory_and_an_unreadable_file_are_named",
         "config file not found"),
    "a directory given as the config file":
        ("test_bad_config.py::test_a_missing_file_a_directory_and_an_unreadable_file_are_named",
         "is a directory, not a file"),
    "an unreadable config file":
        ("test_bad_config.py::test_a_missing_file_a_directory_and_an_unreadable_file_are_named",
         "cannot be read: Permission denied"),
    "a config file saved as cp1252 (read, with a warning)":
        ("test_bad_config.py::test_windows_encoded_files_are_read_with_a_warning_naming_the_line", "read as cp1252"),
    "no --config": ("test_outcomes.py::test_no_config_is_an_error_and_debug_runs_write_their_own_directory",
                    "no --config given"),
    "run_name '../../escaped' (--set)":
        ("test_faults.py::test_run_names_that_escape_the_output_directory_are_refused_before_anything_is_written",
         "escaped.returncode == 2"),
    "run_name that is an absolute path (--hyperparams best_params.json)":
        ("test_faults.py::test_run_names_that_escape_the_output_directory_are_refused_before_anything_is_written",
         "absolute.returncode == 2"),
    "W&B key pasted into an override": ("test_faults.py::test_secrets_never_reach_logs_or_saved_files",
                                        "expected int, got '***'"),
    # the sweep's search-space file
    "a searched key not written section.key":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[must be written section.key]",
         "str(path) in"),
    "a search range with low > high":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[needs low <= high]", "str(path) in"),
    "a condition on a parameter listed after it":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[must be a parameter listed before it]",
         "str(path) in"),
    "an unknown sampler": ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[sampler.name]",
                           "str(path) in"),
    "a space file that is not valid YAML":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[column \\d+: not valid YAML]",
         "str(path) in"),
    "a searched key listed twice":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[appears twice]", "str(path) in"),
    "a space file of the wrong shape (params not a mapping)":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[params must be a mapping]",
         "str(path) in"),
    "an infinite search bound":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[high must be a finite number, got inf]",
         "str(path) in"),
    "a search bound that overflows (-1e400)":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[low: -1.0e+400]", "str(path) in"),
    "a search bound that is no number":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[got 'small']", "str(path) in"),
    "a fractional bound for an integer key":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[got 64.5]", "str(path) in"),
    "a log scale from 0": ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[log needs low > 0]",
                           "str(path) in"),
    "a log flag that is no boolean":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[log must be true or false]",
         "str(path) in"),
    "choices that are no list":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[choices must be a list]", "str(path) in"),
    "a NaN among the choices":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[got nan]", "str(path) in"),
    "an infinite sampler seed":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[sampler.seed must be a finite]",
         "str(path) in"),
    "a misspelt sampler option":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[n_startup_tirals: 3]", "str(path) in"),
    "a pruner option out of range":
        ("test_sweep.py::test_bad_space_files_name_the_file_and_the_problem[n_warmup_steps: -1]", "str(path) in"),
    "a space file saved as cp1252 (read, with a warning)":
        ("test_sweep.py::test_bad_space_file_encodings_ini_duplicates_and_config_refusals_are_named",
         "read as cp1252"),
    # weights and checkpoints
    "model_arch that does not exist": ("test_models.py::test_unknown_arch_and_missing_weights_are_clear_errors",
                                       "unknown model_arch 'ResNet5O'"),
    "missing pretrained weights file": ("test_models.py::test_unknown_arch_and_missing_weights_are_clear_errors",
                                        "pretrained weights file not found"),
    "pretrained weights of another architecture":
        ("test_models.py::test_weights_of_another_architecture_are_refused", "no tensor matches|shape mismatch"),
    "crafted pickle as pretrained weights": ("test_models.py::test_a_crafted_pickle_is_refused",
                                             "cannot read pretrained weights"),
    "checkpoint of another architecture":
        ("test_faults.py::test_a_bad_checkpoint_is_refused_with_a_clear_error_and_nothing_runs[other-architecture]",
         "written for another model"),
    "crafted pickle as DCP .metadata":
        ("test_faults.py::test_a_bad_checkpoint_is_refused_with_a_clear_error_and_nothing_runs[metadata-pickle]",
         "is not a plain DCP metadata file"),
    "crafted pickle as schedule.pt":
        ("test_faults.py::test_a_bad_checkpoint_is_refused_with_a_clear_error_and_nothing_runs[schedule-pickle]",
         "not marker.exists()"),
    "crafted pickle as an RNG file":
        ("test_faults.py::test_a_bad_checkpoint_is_refused_with_a_clear_error_and_nothing_runs[rng-pickle]",
         "not marker.exists()"),
    "crafted pickle in a DCP data file (resume)":
        ("test_checkpoint_safety.py::test_a_pickle_in_a_dcp_data_file_is_refused_on_resume", "assert_refused_naming("),
    "crafted pickle in a DCP data file (convert)":
        ("test_checkpoint_safety.py::test_convert_refuses_a_pickle_in_a_dcp_data_file_with_exit_2_and_one_line",
         "not marker.exists()"),
    "crafted pickle in DeepSpeed model states (resume)":
        ("test_checkpoint_safety.py::test_a_pickle_in_a_deepspeed_state_file_is_refused_on_resume"
         "[mp_rank_00_model_states.pt]", "assert_refused_naming("),
    "crafted pickle in DeepSpeed optimizer states (resume)":
        ("test_checkpoint_safety.py::test_a_pickle_in_a_deepspeed_state_file_is_refused_on_resume"
         "[optim_states.pt]", "assert_refused_naming("),
    "crafted pickle in a ZeRO checkpoint resumed on another world size (universal conversion)":
        ("test_checkpoint_safety.py::test_a_pickle_is_refused_before_the_universal_conversion_and_in_a_universal_"
         "checkpoint[\"zero checkpoint\"]", "assert_refused_naming("),
    "crafted pickle in a universal checkpoint left beside it":
        ("test_checkpoint_safety.py::test_a_pickle_is_refused_before_the_universal_conversion_and_in_a_universal_"
         "checkpoint[universal checkpoint left beside it]", "assert_refused_naming("),
    "crafted pickle in DeepSpeed model states (convert)":
        ("test_checkpoint_safety.py::test_convert_refuses_a_pickle_in_a_deepspeed_state_file_with_exit_2"
         "[mp_rank_00_model_states.pt]", "not marker.exists()"),
    "crafted pickle in DeepSpeed optimizer states (convert)":
        ("test_checkpoint_safety.py::test_convert_refuses_a_pickle_in_a_deepspeed_state_file_with_exit_2"
         "[optim_states.pt]", "not marker.exists()"),
    "a checkpoint beside another architecture's run config (convert)":
        ("test_checkpoint_safety.py::test_convert_names_a_checkpoint_it_cannot_convert_with_exit_2",
         '"model.model_arch" in caplog.text'),
    "a checkpoint copied without its run's resolved_config.ini (convert)":
        ("test_checkpoint_safety.py::test_convert_names_a_checkpoint_it_cannot_convert_with_exit_2",
         "str(config) in caplog.text"),
}


def assertions_of(function: ast.FunctionDef, source: str) -> list[str]:
    """The text of each `assert`, each `pytest.raises(...)` and each call of an assert_* helper in a test."""
    found = []
    for node in ast.walk(function):
        if isinstance(node, ast.Assert) or (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                                            and node.func.id.startswith("assert")):
            found.append(ast.get_source_segment(source, node))
        elif isinstance(node, ast.With):
            found += [text for item in node.items
                      if "pytest.raises" in (text := ast.get_source_segment(source, item.context_expr))]
    return found


def parameters_of(function: ast.FunctionDef, module: ast.Module, source: str) -> str:
    """The text of the function's parametrize decorators and of the module's lists they name."""
    decorators = [node for node in function.decorator_list if "parametrize" in ast.get_source_segment(source, node)]
    named = {name.id for node in decorators for name in ast.walk(node) if isinstance(name, ast.Name)}
    lists = [node for node in module.body if isinstance(node, ast.Assign)
             and any(isinstance(target, ast.Name) and target.id in named for target in node.targets)]
    return "\n".join(ast.get_source_segment(source, node) for node in [*decorators, *lists])


def test_the_bad_input_table_points_at_assertions_that_exist():
    pointed_at = {}
    for case, (reference, piece) in BAD_INPUTS.items():
        module, test = reference.split("::")
        name, _, parameter = test.removesuffix("]").partition("[")
        source = (REPO_ROOT / "tests" / module).read_text()
        tree = ast.parse(source)
        function = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name), None)
        assert function is not None, f"{case}: no test {module}::{name}"
        matching = [text for text in assertions_of(function, source) if piece in text]
        assert len(matching) == 1, f"{case}: {len(matching)} assertions of {module}::{name} contain {piece!r}"
        if parameter:  # one parameter of a parametrized test: a text of its entry
            assert parameter in parameters_of(function, tree, source), f"{case}: no parameter {parameter!r} of {name}"
        where = (module, name, matching[0], parameter)
        assert where not in pointed_at, f"{case} and {pointed_at.get(where)} share one assertion"
        pointed_at[where] = case
    assert f"**Bad inputs tried: {len(BAD_INPUTS)}**" in (REPO_ROOT / "README.md").read_text()


# A tiny ResNet (BatchNorm buffers included) keeps a checkpoint at ~5 MB, so every step can be one.
ARCH = "test_resnet"
WORLD = 2


def trainer_args(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = {"data.shard_dir": shards, "data.image_size": 32, "training.batch_size": 4, "training.n_epochs": 4,
                 "training.num_workers": 0, "training.deterministic": "true", "logging.wandb_mode": "disabled",
                 "model.model_arch": ARCH, "callbacks.checkpoint_every_steps": 1,
                 "callbacks.keep_last_checkpoints": 2}
    args = ["-m", "csi_dist.train", "--config", "configs/demo.ini", "--run-dir", str(run_dir)]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


def start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """A trainer in its own session, output to `log`."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=env or subprocess_env(CSI_REQUEUE="0"), start_new_session=True)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the process and every descendant (torchrun starts each rank in a session of its own)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for member in tree:
        try:
            os.kill(member.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    psutil.wait_procs(tree[1:], timeout=30)


def run(command: list[str], env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=env or subprocess_env(CSI_REQUEUE="0"), capture_output=True,
                          text=True, timeout=timeout)


def python_train(*args: str) -> list[str]:
    return [sys.executable, *args]


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None, interval=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the trainer exited ({process.returncode}) before {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def step_of(path: Path) -> int:
    return int(re.match(r"step-(\d{8})", path.name).group(1))


def partials(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob("step-*.partial")) if root.is_dir() else []


def assert_complete_and_loadable(checkpoint: Path, world_size: int = WORLD) -> None:
    """Every file of the checkpoint is there, whole, and loads without unpickling anything."""
    state = json.loads((checkpoint / STATE_FILE).read_text())
    assert state["global_step"] == step_of(checkpoint), checkpoint
    torch.load(checkpoint / SCHEDULE_FILE, weights_only=True)
    for rank in range(world_size):
        torch.load(checkpoint / f"rng_rank{rank:05d}.pt", weights_only=True)
    state_dir = checkpoint / STRATEGY_STATE_DIR
    metadata = FileSystemReader(str(state_dir)).read_metadata()  # our own file, written by this test's runs
    for info in metadata.storage_data.values():  # model AND optimizer tensors: every byte range is on disk
        assert (state_dir / info.relative_path).stat().st_size >= info.offset + info.length, checkpoint
    weights = full_weights(checkpoint)
    assert weights and all(torch.isfinite(tensor).all() for tensor in weights.values() if tensor.is_floating_point())


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return built_once(tmp_path_factory, "faults_shards",
                      lambda out: write_demo(str(out), n_images=86, image_size=32, seed=3, workers=1))


def train_reference(shards: Path, run_dir: Path) -> None:
    result = run(torchrun_command(WORLD, *trainer_args(shards, run_dir)))
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """The uninterrupted 2-process run every interrupted one must reproduce bit for bit (read-only; built once for
    this file and tests/test_slurm_faults.py)."""
    return built_once(tmp_path_factory, "faults_reference", lambda run_dir: train_reference(shards, run_dir))


# --- kill -9 ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_at_random_steps_never_leaves_a_bad_checkpoint_and_ends_bit_identical(shards, reference, tmp_path):
    steps_total = json.loads((reference / "training_history.json").read_text())[-1]["global_step"]
    rng = random.Random(8)
    run_dir = tmp_path / "run"
    kills, partial_kills = [], 0
    progress, newest = 0, None
    while len(kills) < 5:
        log = tmp_path / f"launch-{len(kills)}.log"
        process = start(torchrun_command(WORLD, *trainer_args(shards, run_dir)), log)
        target = progress + rng.randint(1, 2)
        kill_in_save = len(kills) % 3 == 1  # every third kill aims at a checkpoint being written
        assert target < steps_total, f"the run ends before kill {len(kills) + 1}: {kills}"
        if kill_in_save:
            wait_for(lambda: [p for p in partials(run_dir) if step_of(p) >= target], 120,
                     f"a checkpoint of step >= {target} being written", process)
        else:
            wait_for(lambda: (c := latest_checkpoint(run_dir)) is not None and step_of(c) >= target, 120,
                     f"a checkpoint of step >= {target}", process)
            time.sleep(rng.uniform(0, 0.1))  # anywhere in the next step
        kill_tree(process)

        text = log.read_text()
        if newest is not None:
            assert f"resumed from {newest}" in text, f"launch {len(kills)}, not from {newest}:\n{text[-3000:]}"
        checkpoints = complete_checkpoints(run_dir)
        for checkpoint in checkpoints:
            assert_complete_and_loadable(checkpoint)
        newest = checkpoints[-1]
        left_partial = [p.name for p in partials(run_dir) if step_of(p) > step_of(newest)]
        partial_kills += bool(left_partial)
        progress = max([step_of(newest)] + [step_of(p) for p in partials(run_dir)])  # newest step saved or in save
        kills.append((progress, step_of(newest), left_partial))

    print(f"kills (step, newest complete checkpoint, checkpoint being written): {kills}")  # shown with -s
    assert partial_kills >= 1, f"no kill landed inside a checkpoint write: {kills}"
    assert len({step for step, _, _ in kills}) == len(kills), kills  # 5 different steps
    result = run(torchrun_command(WORLD, *trainer_args(shards, run_dir)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {newest}" in result.stderr
    for name in ("last.safetensors", "best.safetensors"):
        assert differing_tensors(run_dir / "weights" / name, reference / "weights" / name) == [], (name, kills)
    assert (json.loads((run_dir / "training_history.json").read_text())
            == json.loads((reference / "training_history.json").read_text()))


# --- a rank that dies or hangs ----------------------------------------------------------------------------------


def start_ranks(shards: Path, run_dir: Path, tmp_path: Path, *extra: str) -> list[subprocess.Popen]:
    """Two ranks started directly (as srun or submitit start them), so no launcher stands between them."""
    port = free_port()
    processes = []
    for rank in range(WORLD):
        env = subprocess_env(CSI_REQUEUE="0", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                             LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        processes.append(start(python_train(*trainer_args(shards, run_dir, *extra)), tmp_path / f"rank{rank}.log",
                               env))
    return processes


@pytest.mark.parametrize(("message", "lost"), [
    ("Application timeout caused pair closure", True),  # gloo, a frozen peer during DDP's buffer broadcast
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:1: Connection reset by peer", True),
    # what torch 2.14's gloo raised for a killed and for a frozen peer (a real 2-process probe, recorded)
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
     "[127.0.0.1]:15257. This is typically caused by a remote worker crashing.", True),
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for "
     "recv operation to complete", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x6)", False),
    # torch types NCCL's failures: a plain RuntimeError that merely names NCCL is not a lost peer
    ("NCCL is not available in this build of torch", False),
])
def test_only_errors_of_a_lost_peer_count_as_a_lost_rank(message, lost):
    from csi_dist.core.distributed import is_collective_failure
    assert is_collective_failure(RuntimeError(message)) is lost


@pytest.mark.parametrize("error_type", ["DistBackendError", "DistStoreError", "DistNetworkError"])
def test_torchs_typed_distributed_errors_count_as_a_lost_rank_whatever_their_wording(error_type):
    """NCCL ("NCCL communicator was aborted on rank 3"), the TCP store and rendezvous raise these types: the type
    decides, not the text (a message torch may reword)."""
    import torch.distributed
    from csi_dist.core.distributed import is_collective_failure
    error_class = getattr(torch.distributed, error_type)
    assert is_collective_failure(error_class("NCCL communicator was aborted on rank 3"))
    assert is_collective_failure(error_class("wording no marker knows"))
    assert not is_collective_failure(ValueError("NCCL communicator was aborted on rank 3"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["rank-killed", "rank-frozen"])
def test_survivor_of_a_lost_rank_exits_with_a_clear_error_in_bounded_time(shards, tmp_path, fault):
    timeout_s = 5
    run_dir = tmp_path / "run"
    survivor, victim = start_ranks(shards, run_dir, tmp_path, "--set", "training.n_epochs=100",
                                   "--set", f"training.collective_timeout_s={timeout_s}")
    try:
        wait_for(lambda: (c := latest_checkpoint(run_dir)) is not None and step_of(c) >= 2, 120,
                 "training to be under way", survivor)
        os.kill(victim.pid, fault)
        signalled = time.monotonic()
        returncode = survivor.wait(timeout=timeout_s + 60)
        waited = time.monotonic() - signalled
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                kill_tree(process)
    text = (tmp_path / "rank0.log").read_text()
    assert returncode == 3, text[-3000:]
    assert waited < timeout_s + 15, f"the survivor took {waited:.1f} s"
    assert re.search(r"rank0.*lost contact with another rank .*collective_timeout_s=5 s", text), text[-3000:]
    if fault == signal.SIGSTOP:
        assert waited >= timeout_s - 0.5 and "Timed out" in text  # the collective timeout, not a closed socket
    assert "--resume auto continues from the newest complete checkpoint" in text
    assert "Traceback" not in text
    for checkpoint in complete_checkpoints(run_dir):
        assert_complete_and_loadable(checkpoint)


# --- non-finite losses --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("optimizer", ["adamw", "fused adamw"])
def test_non_finite_losses_are_skipped_and_counted_then_stop_the_run_after_max_bad_steps(shards, tmp_path, optimizer):
    # "fused adamw": the optimizer skips on the device and the trainer reads each outcome one update later (what a
    # GPU run does; here on the CPU's fused kernel), the other decides on the host at every update
    one_epoch = ["--set", "training.n_epochs=1", "--set", "training.max_bad_steps=2", "--set",
                 f"optimization.fused_optimizer={str(optimizer == 'fused adamw').lower()}"]
    # step 2: a NaN image in rank 0's forward pass, so BatchNorm folds a NaN into its running statistics (rank 0's:
    # DDP hands rank 0's buffers to every rank); step 5: an infinite loss on rank 1 only, which the gradient
    # all-reduce carries to rank 0. Both ranks skip both steps. Every checkpoint is kept, to look at either side.
    env = subprocess_env(CSI_REQUEUE="0", CSI_FAULT_NONFINITE_INPUT="2:nan:0", CSI_FAULT_NONFINITE_LOSS="5:inf:1")
    run_dir = tmp_path / "skips"
    result = run(torchrun_command(WORLD, *trainer_args(shards, run_dir, *one_epoch,
                                                       "--set", "callbacks.keep_last_checkpoints=100")), env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    on_device = "fused: a non-finite update is skipped on the device" in result.stderr
    assert on_device == (optimizer == "fused adamw")
    skipped = re.findall(r"\[rank(\d)\].*non-finite loss/gradients at epoch 0 step (\d): step skipped "
                         r"\((\d) of at most 2\)", result.stderr)
    expected = [("0", "2", "1"), ("0", "5", "2"), ("1", "2", "1"), ("1", "5", "2")]
    assert sorted(skipped) == expected, result.stderr[-3000:]
    final = latest_checkpoint(run_dir)
    assert json.loads((final / STATE_FILE).read_text())["bad_steps"] == 2
    # a skipped step leaves the model as it was, BatchNorm buffers included: the state after it is bit-identical to
    # the state before it, while the real steps after step 6 change both parameters and buffers
    states = {step: full_weights(run_dir / "checkpoints" / f"step-{step:08d}") for step in (2, 3, 5, 6)}
    last = load_file(str(run_dir / "weights" / "last.safetensors"))
    buffers = [name for name in last if name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(buffers) >= 3 * 8 and len(last) > len(buffers)  # test_resnet's BatchNorms, and its parameters
    for before, after in ((2, 3), (5, 6)):
        changed = [name for name in last if not torch.equal(states[before][name], states[after][name])]
        assert changed == [], f"the skipped step {before} changed {changed[:5]}"
    really_changed = {name for name in last if not torch.equal(states[6][name], last[name])}
    assert set(buffers) <= really_changed and really_changed - set(buffers)
    assert all(torch.isfinite(tensor).all() for tensor in last.values() if tensor.is_floating_point())
    steps = json.loads((final / STATE_FILE).read_text())["global_step"]
    assert steps >= 7 and all(int(last[name]) == steps - 2 for name in buffers if name.endswith("num_batches_tracked"))
    assert all(isinstance(record["val_loss"], float) and math.isfinite(record["val_loss"])  # uses the statistics
               for record in json.loads((run_dir / "training_history.json").read_text()))

    env = subprocess_env(CSI_REQUEUE="0", CSI_FAULT_NONFINITE_LOSS="1:nan,3:inf,4:nan")
    result = run(torchrun_command(WORLD, *trainer_args(shards, tmp_path / "stops", *one_epoch)), env=env)
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*4\b", result.stderr), result.stderr[-3000:]
    assert "3 non-finite steps (training.max_bad_steps=2); lower the learning rate or check data" in result.stderr


# --- bad checkpoints ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["other-architecture", "metadata-pickle", "schedule-pickle", "rng-pickle"])
def test_a_bad_checkpoint_is_refused_with_a_clear_error_and_nothing_runs(shards, reference, tmp_path, attack):
    checkpoint = tmp_path / "run" / "checkpoints" / latest_checkpoint(reference).name
    shutil.copytree(latest_checkpoint(reference), checkpoint)
    marker = tmp_path / "owned"
    extra = []
    if attack == "other-architecture":
        extra = ["--set", "model.model_arch=Custom_1"]
    elif attack == "metadata-pickle":
        with open(checkpoint / STRATEGY_STATE_DIR / ".metadata", "wb") as handle:
            pickle.dump(Payload(marker), handle)
    else:
        torch.save({"state": Payload(marker)},
                   checkpoint / (SCHEDULE_FILE if attack == "schedule-pickle" else "rng_rank00000.pt"))
    result = run(python_train(*trainer_args(shards, tmp_path / "run", *extra, "--resume", str(checkpoint))))
    assert result.returncode == 2, result.stderr[-3000:]
    assert not marker.exists(), "the crafted pickle was executed"
    if attack == "metadata-pickle":
        assert f"{checkpoint}/state/.metadata is not a plain DCP metadata file, refused" in result.stderr
    elif attack == "other-architecture":
        assert re.search(rf"cannot resume from checkpoint {checkpoint}: RuntimeError: Missing key in checkpoint "
                         r"state_dict: model\.backbone\.\S+ \(written for another model: check model.model_arch\)",
                         result.stderr), result.stderr[-3000:]
    else:
        assert f"cannot resume from checkpoint {checkpoint}" in result.stderr
    assert "Traceback" not in result.stderr


# --- bad inputs in shards and CSVs ---------------------------------------------------------------------------------


def jpeg_bytes(size: int = 32) -> bytes:
    import io
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(noise, mode="L").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def decode_failures(shard_dir: Path, split: str = "train") -> tuple[int, list[str]]:
    """(steps, indexes of the samples counted as undecodable, padding copies left out) of one epoch on one rank."""
    loader = build_loader(open_split(shard_dir, split), LoaderSettings(batch_size=4, image_size=16), epoch=0, rank=0,
                          world_size=1)
    batches = list(loader)
    failed = [int(index) for batch in batches
              for index, bad, padding in zip(batch["sample_index"], batch["decode_failed"], batch["is_padding"])
              if bad and not padding]
    return len(batches), failed


def test_truncated_jpeg_and_out_of_range_label_inside_a_shard_are_counted_skips(tmp_path, caplog):
    full_jpeg = jpeg_bytes()

    def damage(sample: dict) -> dict:
        if sample["__key__"] == "train-00001":  # a JPEG cut short, as by an interrupted copy
            del sample["png"]
            sample["jpg"] = full_jpeg[:len(full_jpeg) // 2]
        if sample["__key__"] == "train-00006":
            labels = json.loads(sample["json"])
            sample["json"] = json.dumps({**labels, "zones": [0, 1, 7, 0, 0, 0]}).encode()
        return sample

    root = write_shards(tmp_path / "s", {"train": [4, 4]}, edit_sample=damage)
    steps, failed = decode_failures(root)
    assert steps == 2 and failed == [1, 6]
    assert re.search(r"skipping undecodable sample 'train-00001' of \S*shard-000000.tar: DecodeError: .*truncated",
                     caplog.text), caplog.text
    assert re.search(r"sample 'train-00006' of \S*shard-000001.tar: ValueError: zones \[0, 1, 7, 0, 0, 0\] are not "
                     r"6 values in 0..4", caplog.text), caplog.text


def test_corrupt_bytes_inside_a_shard_cost_only_the_samples_they_hit(tmp_path, caplog):
    """Random bytes over the tar headers and images of 3 samples used to make the whole shard unreadable: 9 of 9
    samples lost. The manifest's per-sample index (offsets and checksums) confines the damage to those 3."""
    root = write_shards(tmp_path / "s", {"train": [9]})
    shard = root / "train" / "shard-000000.tar"
    with tarfile.open(shard) as archive:
        spans = {member.name: (member.offset, member.offset_data + member.size) for member in archive}
    data = bytearray(shard.read_bytes())
    random_bytes = np.random.default_rng(0)
    for key in ("train-00002", "train-00005", "train-00007"):
        start, end = spans[f"{key}.png"]
        data[start:end] = random_bytes.bytes(end - start)  # the image member's headers and data
    shard.write_bytes(bytes(data))
    steps, failed = decode_failures(root)
    assert steps == 3 and failed == [2, 5, 7]
    assert re.search(r"skipping undecodable sample 'train-00005' of \S*shard-000000.tar: .*checksum", caplog.text), \
        caplog.text


def test_shards_whose_manifest_has_no_sample_index_are_still_read(tmp_path):
    """Manifests written before the per-sample index: the reader indexes the tar headers itself."""
    root = write_shards(tmp_path / "s", {"train": [5, 4]}, sample_index=False)
    steps, failed = decode_failures(root)
    assert steps == 3 and failed == []


def test_duplicate_key_inside_a_shard_is_named_and_its_samples_counted(tmp_path, caplog):
    def duplicate(sample: dict) -> dict:
        if sample["__key__"] == "train-00002":
            sample["__key__"] = "train-00001"
        return sample

    root = write_shards(tmp_path / "s", {"train": [4, 4]}, edit_sample=duplicate)
    steps, failed = decode_failures(root)
    assert steps == 2 and failed == [0, 1, 2, 3]  # that shard's samples can no longer be told apart
    assert re.search(r"shard \S*shard-000000.tar holds 3 samples, the manifest says 4", caplog.text), caplog.text


def test_empty_shards_and_an_empty_train_split(tmp_path, caplog):
    root = write_shards(tmp_path / "s", {"train": [3, 0, 4], "val": [2]})
    steps, failed = decode_failures(root)
    assert steps == 2 and failed == []  # a shard with no samples is just skipped by the plan

    empty = root / "train" / "shard-000002.tar"
    empty.write_bytes(b"")
    with pytest.raises(ShardError, match=r"shard-000002.tar has 0 bytes, the manifest says \d+: truncated"):
        open_split(root, "train")

    no_train = write_shards(tmp_path / "no_train", {"train": [], "val": [2]})
    result = run(python_train(*trainer_args(no_train, tmp_path / "run")))
    assert result.returncode == 2 and "the train split is empty" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("zones,csi,column", [((0, "inf", 0, 0, 0, 0), "", "left_sup"),
                                              ((0, 0, 0, 0, 0, 0), "-inf", "csi")], ids=["inf-grade", "minus-inf-csi"])
def test_infinite_values_in_the_csv_are_named(tmp_path, zones, csi, column):
    csv_path = write_csv(tmp_path / "labels.csv", [label_row("1"), label_row("2", zones, csi)])
    with pytest.raises(LabelError, match=rf"line 3, column {column}"):
        read_label_csv(csv_path)


# --- paths and secrets ---------------------------------------------------------------------------------------------


def test_run_names_that_escape_the_output_directory_are_refused_before_anything_is_written(shards, tmp_path):
    output_dir = tmp_path / "runs"
    best_params = tmp_path / "best_params.json"
    best_params.write_text(json.dumps({"best_params": {"logging.run_name": str(tmp_path / "elsewhere")}}))
    command = [sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini",
               "--set", f"data.shard_dir={shards}", "--set", f"logging.output_dir={output_dir}"]
    escaped = run([*command, "--set", "logging.run_name=../../escaped"])
    assert escaped.returncode == 2 and "'../../escaped' must be a plain name, not a path" in escaped.stderr, \
        escaped.stderr[-3000:]
    absolute = run([*command, "--hyperparams", str(best_params)])
    assert absolute.returncode == 2 and f"'{tmp_path / 'elsewhere'}' must be a plain name" in absolute.stderr, \
        absolute.stderr[-3000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best_params.json"]


@pytest.mark.slow
def test_secrets_never_reach_logs_or_saved_files(shards, tmp_path):
    secrets = {"WANDB_API_KEY": "wandb" + "0123456789abcdef" * 2 + "cafe", "HF_TOKEN": "hf_FaultSuiteToken12345"}
    env = subprocess_env(CSI_REQUEUE="0", **secrets)
    run_dir = tmp_path / "run"
    # a token pasted into a config value W&B records (the group) must not reach W&B's files either
    result = run(python_train(*trainer_args(shards, run_dir, "--set", "logging.wandb_mode=offline",
                                            "--set", f"logging.wandb_group=study-{secrets['HF_TOKEN']}",
                                            "--set", "training.max_steps=2")), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((run_dir / "wandb").glob("offline-run-*"))  # W&B did write its files
    # the mistake users make: a token pasted where a value goes; the error names the key but masks the value
    typo = run([sys.executable, "-m", "csi_dist.train", "--config", "configs/demo.ini",
                "--set", f"training.seed={secrets['HF_TOKEN']}"], env=env)
    assert typo.returncode == 2 and "training.seed=***': expected int, got '***'" in typo.stderr, typo.stderr

    leaks = []
    for secret in secrets.values():
        for text, where in ((result.stdout + result.stderr, "training output"), (typo.stderr, "error output")):
            if secret in text:
                leaks.append(where)
        for path in run_dir.rglob("*"):
            if path.is_file() and secret.encode() in path.read_bytes():
                leaks.append(str(path.relative_to(run_dir)))
    assert leaks == []
