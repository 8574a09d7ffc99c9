#!/usr/bin/env bash
# Create .venv with the exact pins of requirements-lock.txt and install csi_dist into it (idempotent, ~2 min).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.csi_dist-installed
if [ ! -f "$stamp" ] || [ requirements-lock.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing pinned dependencies into .venv"
  # pip lists every local wheel-cache folder it cannot use; those lines are noise here
  .venv/bin/pip install -q -r requirements-lock.txt 2>&1 | { grep -v "^WARNING: Location" || true; }
  .venv/bin/pip install -q --no-deps -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
  .venv/bin/python -c "import csi_dist.train" && touch "$stamp"
fi
