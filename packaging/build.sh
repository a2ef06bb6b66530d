#!/usr/bin/env bash
# Builds the standalone Linux app folder dist/quantscope/ with PyInstaller, then launches the built
# app (CLI and, offscreen, the GUI) to prove it starts. Takes 10-20 minutes on 2 cores: not for CI.
#   packaging/build.sh            build + smoke test
#   packaging/build.sh --no-test  build only
# Dependencies come from constraints.txt (the tested versions; see README.md). PyInstaller comes
# from the `package` extra of pyproject.toml. If the project venv lacks it, a separate build venv
# (build/package-venv) is made that sees the project venv's packages through a .pth file, so the
# project venv itself is never modified.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

run_tests=1
for arg in "$@"; do
  case "$arg" in
    --no-test) run_tests=0 ;;
    *) echo "usage: packaging/build.sh [--no-test]" >&2; exit 2 ;;
  esac
done

# Always through dev.sh: it installs the locked versions (constraints.txt) and is a no-op when .venv
# already holds them, so the bundle is built from what the test suite ran with.
./dev.sh setup

if .venv/bin/python -c 'import PyInstaller' 2>/dev/null; then
  py=.venv/bin/python
else
  py=build/package-venv/bin/python
  if ! "$py" -c 'import PyInstaller, core, torch' 2>/dev/null; then
    echo "build.sh: creating build/package-venv (PyInstaller on top of .venv's packages)" >&2
    .venv/bin/python -m venv build/package-venv
    project_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    build_site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; site.addsitedir('$project_site')" > "$build_site/_quantscope_project.pth"
    # The requirement string is read from pyproject.toml so the extra stays the one source.
    req=$(.venv/bin/python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["package"]))')
    # -c: PyInstaller's own dependencies (packaging, setuptools) stay at the locked versions the
    # project venv shares with this one.
    "$py" -m pip install --disable-pip-version-check -q -c constraints.txt $req
  fi
fi

echo "build.sh: building with $("$py" -m PyInstaller --version 2>/dev/null | tail -1) ($py)" >&2
start=$(date +%s)
"$py" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath dist --workpath build/pyinstaller packaging/quantscope.spec
echo "build.sh: built dist/quantscope in $(( $(date +%s) - start )) s, size $(du -sh dist/quantscope | cut -f1)" >&2

if [ "$run_tests" = 1 ]; then
  packaging/smoke_test.sh dist/quantscope/quantscope
fi
