"""Checkpoint rotation: a kill at any point of a save leaves at least one complete checkpoint (issue 14, item 8)."""
from __future__ import annotations

from pathlib import Path

import pytest

from csi_dist.training.checkpoint_files import STATE_FILE, latest_checkpoint, save_checkpoint


class OneProcess:
    is_main_process = True
    process_index = 0

    def wait_for_everyone(self) -> None:
        pass


class FileStrategy:
    """Writes the model 'state' as one file, so the test can tell checkpoints apart."""

    def __init__(self, label: str):
        self.label = label

    def save(self, model, optimizer, directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "model.txt").write_text(self.label)


def save(run_dir: Path, step: int, label: str) -> Path:
    return save_checkpoint(OneProcess(), FileStrategy(label), run_dir, step, model=None, optimizer=None,
                           schedule_state={}, trainer_state={"global_step": step}, keep_last=1)


def test_resaving_the_same_step_with_keep_last_1_never_leaves_zero_complete_checkpoints(tmp_path: Path, monkeypatch):
    first = save(tmp_path, 7, "first")
    assert latest_checkpoint(tmp_path) == first

    # a kill right after the old checkpoint was moved aside, before the new one got its name
    real_rename = Path.rename

    def killed_before_the_new_name(self: Path, target):
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt("killed")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_name)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 7, "second")
    monkeypatch.setattr(Path, "rename", real_rename)
    survivor = latest_checkpoint(tmp_path)
    assert survivor is not None and (survivor / "state" / "model.txt").read_text() == "first"
    assert (survivor / STATE_FILE).is_file()

    # the next save of that step completes and is the only checkpoint left
    again = save(tmp_path, 7, "third")
    assert latest_checkpoint(tmp_path) == again and (again / "state" / "model.txt").read_text() == "third"
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["step-00000007"]
