#!/usr/bin/env bash
# Create .venv with the exact pins of requirements-lock.txt and install csi_dist into it (idempotent, ~2 min).
# The pins are installed by uv (faster than pip on 2 cores: it unpacks and byte-compiles in parallel), pointed at
# the same indexes and wheel folders pip is configured with; where uv cannot be installed, pip installs them.
# Byte-compiled at install, as pip does: under PYTHONDONTWRITEBYTECODE every process (the tests start hundreds)
# would otherwise compile torch's modules again on import.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.csi_dist-installed

quiet_pip() {  # pip lists every local wheel-cache folder it cannot use; those lines are noise here
  .venv/bin/pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
}

pip_setting() {  # pip's value of an option: its PIP_* variable, else pip's config files (may be empty)
  local variable
  variable="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  printf '%s' "${!variable:-$(.venv/bin/pip config get "global.$1" 2>/dev/null || true)}"
}

install_with_uv() {  # uv, told where pip looks, and like pip free to take each pin from any of those places
  quiet_pip install -q "$(grep '^uv==' requirements-lock.txt)" || return 1
  local sources=(--index-strategy unsafe-best-match) url
  for url in $(pip_setting index-url); do sources+=(--index-url "$url"); done
  for url in $(pip_setting extra-index-url); do sources+=(--extra-index-url "$url"); done
  for url in $(pip_setting find-links); do sources+=(--find-links "$url"); done
  local uv_install=(.venv/bin/uv pip install -q --python .venv/bin/python "${sources[@]}")
  "${uv_install[@]}" --compile-bytecode -r requirements-lock.txt || return 1
  "${uv_install[@]}" --no-deps -e .
}

install_with_pip() {
  quiet_pip install -q -r requirements-lock.txt
  quiet_pip install -q --no-deps -e .
}

if [ ! -f "$stamp" ] || [ requirements-lock.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing pinned dependencies into .venv"
  install_with_uv || { echo "[setup] uv could not install them; pip will"; install_with_pip; }
  .venv/bin/python -c "import csi_dist.train" && touch "$stamp"
fi
