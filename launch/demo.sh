#!/usr/bin/env bash
# The README demo in one command: set up .venv, write phantom shards, train, evaluate (GPU if present, else CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export WANDB_MODE=${WANDB_MODE:-offline}
.venv/bin/python -m csi_dist.demo "$@"
echo "[demo] report: checkpoints/demo/evaluation/test_report.md"
