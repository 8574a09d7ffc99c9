"""DataLoader workers are forked from a single-threaded fork server, not from the rank, and ignore stop notices.

A rank has several threads when it builds a loader; a worker forked from it inherits the locks they held and can wait
forever (a resumed 2-node CI job hung that way at the end of an epoch). SLURM signals every process of a step, so a
worker must outlive SIGTERM/USR1/USR2 until its rank has decided to stop.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import torch

from csi_dist.core.config import load_config
from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
from conftest import REPO_ROOT, subprocess_env


def test_workers_come_from_a_single_threaded_process_and_outlive_the_notices(phantom_shards):
    config = load_config(REPO_ROOT / "configs" / "demo.ini",
                         [f"data.shard_dir={phantom_shards}", "data.image_size=32", "training.batch_size=4",
                          "training.num_workers=2"])
    shard_set = open_split(phantom_shards, "train")
    settings = LoaderSettings.from_config(config, 32, train=True)
    busy = threading.Event()
    helper = threading.Thread(target=busy.wait, daemon=True)  # the rank is multi-threaded, as a real one is
    helper.start()
    loader = build_loader(shard_set, settings, epoch=0, rank=0, world_size=1)
    batches = iter(loader.loader)
    first = next(batches)
    workers = [psutil.Process(pid) for pid in (worker.pid for worker in batches._workers)]
    assert len(workers) == 2
    for worker in workers:
        parent = worker.parent()
        assert parent.pid != os.getpid(), "a worker was forked from the multi-threaded rank"
        assert parent.num_threads() == 1
        # and imports what a worker runs, not the shard writer's pandas: on the GPU image pandas loads pyarrow,
        # whose allocator starts a thread in the fork server (2 threads there, this test's failure on the H200)
        mapped = Path(f"/proc/{parent.pid}/maps").read_text()
        assert [package for package in ("pandas", "pyarrow") if f"/{package}/" in mapped] == []
        for notice in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            worker.send_signal(notice)
    rest = list(batches)  # every worker still serves its share of the epoch, the same batches as in-process
    busy.set()
    in_process = LoaderSettings.from_config(
        load_config(REPO_ROOT / "configs" / "demo.ini", [f"data.shard_dir={phantom_shards}", "data.image_size=32",
                                                         "training.batch_size=4", "training.num_workers=0"]),
        32, train=True)
    expected = list(build_loader(shard_set, in_process, epoch=0, rank=0, world_size=1))
    assert len(expected) == len(loader) == 1 + len(rest)
    for got, wanted in zip([first, *rest], expected):
        assert torch.equal(got["sample_index"], wanted["sample_index"]) and torch.equal(got["image"], wanted["image"])


UNGUARDED_SCRIPT = """
import sys
from csi_dist.core.config import load_config
from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
with open(sys.argv[2], "a") as runs:  # the script's top level, with no main guard: it must run once
    runs.write("ran\\n")
config = load_config(sys.argv[3], [f"data.shard_dir={sys.argv[1]}", "data.image_size=32", "training.batch_size=4",
                                   "training.num_workers=2"])
loader = build_loader(open_split(sys.argv[1], "train"), LoaderSettings.from_config(config, 32, train=True),
                      epoch=0, rank=0, world_size=1)
print("batches", sum(1 for _ in loader), len(loader))
"""


def test_a_script_without_a_main_guard_builds_loaders_and_runs_once(phantom_shards, tmp_path):
    """Workers that are not plain forks of their parent rerun its main module by default; ours never do, so a
    user's script without `if __name__ == "__main__":` is not run again in every worker."""
    script, runs = tmp_path / "unguarded.py", tmp_path / "runs.txt"
    script.write_text(UNGUARDED_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(phantom_shards), str(runs),
                             str(REPO_ROOT / "configs" / "demo.ini")],
                            capture_output=True, text=True, timeout=120, env=subprocess_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    served, planned = map(int, result.stdout.split()[1:3])
    assert served == planned > 0
    assert runs.read_text().splitlines() == ["ran"]


SLOW_SCRIPT = """
import sys, time
from csi_dist.core.config import load_config
from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
config = load_config(sys.argv[2], [f"data.shard_dir={sys.argv[1]}", "data.image_size=32", "training.batch_size=4",
                                   "training.num_workers=2"])
for batch in build_loader(open_split(sys.argv[1], "train"), LoaderSettings.from_config(config, 32, train=True),
                          epoch=0, rank=0, world_size=1):
    print("training", flush=True)
    time.sleep(600)
"""


def test_a_killed_ranks_workers_and_fork_server_go_with_it(phantom_shards, tmp_path):
    """The fork server lives while any worker holds its alive pipe, and torch's worker watchdog watches the fork
    server: without a watch on the rank, a killed rank's workers and server lived on forever (holding a SLURM step's
    output open, so the step took 60 s to end, and piling up on the node)."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT)
    rank = subprocess.Popen([sys.executable, str(script), str(phantom_shards), str(REPO_ROOT / "configs" / "demo.ini")],
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
    try:
        assert rank.stdout.readline().strip() == "training"
        helpers = psutil.Process(rank.pid).children(recursive=True)
        assert len(helpers) >= 3  # the fork server and 2 workers
    finally:
        rank.kill()
        rank.wait(timeout=30)
    _, alive = psutil.wait_procs(helpers, timeout=15)
    assert alive == [], [process.cmdline()[:3] for process in alive]


NOTICE_PROBE = """
import os, signal
from csi_dist.data.workers import start_worker

def notice_then_start(rank_pid, worker_id):  # a worker_init_fn: the notice lands where torch's own handlers rule
    os.kill(os.getpid(), signal.SIGTERM)
    start_worker(rank_pid, worker_id)
"""

EARLY_NOTICE_SCRIPT = """
import functools, os, sys
from torch.utils.data import DataLoader
from csi_dist.data.workers import worker_options
from notice_probe import notice_then_start
options = worker_options(1)
options["worker_init_fn"] = functools.partial(notice_then_start, os.getpid())
print([batch.tolist() for batch in DataLoader(range(4), batch_size=2, num_workers=1, **options)])
"""


def test_a_notice_while_a_worker_starts_is_not_its_end(tmp_path):
    """torch installs a SIGTERM handler that ends the worker before it runs our init, which ignores the notices: a
    SLURM SIGTERM in that window (workers start at every epoch) killed the worker and raised in its rank. Here the
    notice is sent inside that window; the worker must serve its batches."""
    (tmp_path / "notice_probe.py").write_text(NOTICE_PROBE)
    (tmp_path / "early.py").write_text(EARLY_NOTICE_SCRIPT)
    result = subprocess.run([sys.executable, "early.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=subprocess_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)])))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[[0, 1], [2, 3]]"
