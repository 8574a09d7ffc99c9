#!/usr/bin/env bash
# All tests in one command: set up .venv, start the local SLURM cluster (as root), run pytest (args passed on).
# Three pytest-xdist workers (CSI_TEST_WORKERS; 0 = none), a file per worker at a time, tests/test_slurm*.py on one
# (tests/conftest.py groups them). Alone the suite mostly waits on SLURM and on processes starting; on a loaded
# machine it is bound by the CPU (BENCHMARKS.md), so more workers do not help there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${CSI_SKIP_SLURM:-0}" != 1 ]; then
  trap 'bash slurm/stop_cluster.sh >/dev/null 2>&1 || true' EXIT
  SLURM_ACCOUNTING=1 bash slurm/start_cluster.sh >/tmp/csi-slurm-start.log 2>&1 \
    || { cat /tmp/csi-slurm-start.log; exit 1; }
fi
export WANDB_MODE=offline DS_ACCELERATOR=cpu
# The suite starts hundreds of Python processes: under PYTHONDONTWRITEBYTECODE each compiled the package (and the
# test helpers) again, 0.25 s of CPU apiece (.venv's packages are compiled at install, launch/setup.sh).
unset PYTHONDONTWRITEBYTECODE
.venv/bin/python -m pytest -n "${CSI_TEST_WORKERS:-3}" --dist loadfile "$@"
