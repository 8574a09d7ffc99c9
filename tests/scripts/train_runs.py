"""Several trainer runs in one launch, one after the other (the parity suite: imports and process start paid once).

argv: RESULTS_JSON then one RUN_DIR=OVERRIDE,OVERRIDE,... per run; each run is `csi_dist.train.main` (or the `main`
of the module in CSI_RUN_MODULE, e.g. csi_dist.evaluate) with `--run-dir RUN_DIR --set OVERRIDE ...` and the
common arguments in the CSI_TRAIN_ARGS environment variable. Rank 0
writes {RUN_DIR: exit status} (an exception counts as 1, its traceback is printed; a SystemExit gives its code), so a test reads the exit status
of every run as a user would see it. The runs share one process group: each run's end would destroy it (and
accelerate and DeepSpeed keep handles on it), so it is destroyed once, after the last run.
"""
import importlib
import json
import os
import shlex
import sys
import traceback

import torch.distributed


main = importlib.import_module(os.environ.get("CSI_RUN_MODULE", "csi_dist.train")).main
results_path, *runs = sys.argv[1:]
common = shlex.split(os.environ.get("CSI_TRAIN_ARGS", ""))
destroy_process_group = torch.distributed.destroy_process_group
torch.distributed.destroy_process_group = lambda *args, **kwargs: None
statuses = {}
for run in runs:
    run_dir, _, overrides = run.partition("=")
    argv = [*common, "--run-dir", run_dir, *[arg for item in overrides.split(",") if item for arg in ("--set", item)]]
    try:
        statuses[run_dir] = main(argv)
    except SystemExit as stop:  # a notice: the trainer saved and exits 75 (csi_dist.cluster.preemption)
        statuses[run_dir] = stop.code
    except Exception:  # noqa: BLE001 - what `python -m csi_dist.train` would have died of, as exit status 1
        traceback.print_exc()
        statuses[run_dir] = 1
if os.environ.get("RANK", "0") == "0":
    with open(results_path, "w") as handle:
        json.dump(statuses, handle)
if torch.distributed.is_initialized():
    destroy_process_group()
