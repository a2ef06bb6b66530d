#!/usr/bin/env bash
# Launches a built Quantscope app to prove it starts and works: --version, the GPU/RAM report as
# JSON, a real 4-bit quantization + evaluation of a tiny random model, a job process as the GUI
# starts one, and the GUI offscreen.
#   packaging/smoke_test.sh [dist/quantscope/quantscope]
# Prints one "ok"/"FAIL" line per check with its wall time; exit code 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
app=$(realpath "${1:-dist/quantscope/quantscope}")
[ -x "$app" ] || { echo "smoke_test.sh: $app is not an executable; build it with packaging/build.sh" >&2; exit 2; }
export QT_QPA_PLATFORM=offscreen HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
report() {  # name status seconds [detail]
  printf '%-4s %-34s %7s s  %s\n' "$2" "$1" "$3" "${4:-}"
  [ "$2" = FAIL ] && failed=1; return 0
}
is_json() { .venv/bin/python -c 'import json, sys; json.load(open(sys.argv[1]))' "$1" 2>/dev/null; }

echo "smoke_test.sh: $app (bundle $(du -sh "$(dirname "$app")" | cut -f1))"

want="quantscope $(.venv/bin/python -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
for run in cold warm; do
  t=$(now); got=$("$app" --version 2>&1); s=$(elapsed "$t")
  [ "$got" = "$want" ] && report "--version ($run)" ok "$s" "$got" || report "--version ($run)" FAIL "$s" "got: $got"
done

help=$("$app" --help 2>&1)
if grep -qw catalog <<<"$help"; then probe=(catalog gpus --json); else probe=(gpus --json); fi
t=$(now)
if "$app" "${probe[@]}" >"$work/probe.json" 2>"$work/probe.err" && is_json "$work/probe.json"; then
  report "${probe[*]}" ok "$(elapsed "$t")"
else
  report "${probe[*]}" FAIL "$(elapsed "$t")" "$(tail -1 "$work/probe.err")"
fi

# A tiny random Llama with a real tokenizer (the test suite's own fixture builder), made by the
# project venv; the frozen app must then import transformers' modeling code and the RTN method.
if grep -qw quantize <<<"$help" && .venv/bin/python - "$work/tiny" <<'PY' 2>"$work/tiny.err"
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import build_tokenizer, make_tiny_model
make_tiny_model(Path(sys.argv[1]), build_tokenizer())
PY
then
  t=$(now)
  if "$app" quantize --model "$work/tiny" --method rtn --bits 4 --out "$work/q" --json >"$work/q.json" 2>"$work/q.err" \
      && is_json "$work/q.json"; then
    report "quantize rtn 4-bit (tiny llama)" ok "$(elapsed "$t")"
    # numba is bundled: a frozen app that fell back to the torch path says so on stderr.
    if grep -q "native kernels unavailable" "$work/q.err"; then
      report "native kernels (numba) in the bundle" FAIL 0 "$(grep -m1 "native kernels unavailable" "$work/q.err")"
    else
      report "native kernels (numba) in the bundle" ok 0
    fi
  else
    report "quantize rtn 4-bit (tiny llama)" FAIL "$(elapsed "$t")" "$(tail -1 "$work/q.err")"
  fi
  if grep -qw eval <<<"$help"; then
    t=$(now)
    if "$app" eval --model "$work/q" --reference "$work/tiny" --windows 2 --seq-len 64 --json >"$work/e.json" 2>"$work/e.err" \
        && is_json "$work/e.json"; then
      report "eval quantized vs reference" ok "$(elapsed "$t")" \
        "$(.venv/bin/python -c 'import json,sys; d=json.load(open(sys.argv[1])); print("ppl", round(d["perplexity"], 2))' "$work/e.json")"
    else
      report "eval quantized vs reference" FAIL "$(elapsed "$t")" "$(tail -1 "$work/e.err")"
    fi
  fi
else
  report "quantize (tiny llama)" skip 0 "no quantize subcommand or no fixture builder: $(tail -1 "$work/tiny.err" 2>/dev/null)"
fi

# The GUI runs its jobs in spawned job processes (app/jobproc.py): the frozen app must start one
# (multiprocessing.freeze_support in quantscope_entry.py turns the re-executed program into it).
t=$(now)
if jp=$("$app" -m app.jobproc 2>"$work/jobproc.err") && grep -q "^job process ok" <<<"$jp"; then
  report "job process (the GUI's jobs)" ok "$(elapsed "$t")" "$jp"
else
  report "job process (the GUI's jobs)" FAIL "$(elapsed "$t")" "${jp:-$(tail -1 "$work/jobproc.err")}"
fi

# GUI, offscreen. With the GUI's own --smoke-test flag the app builds its window, shows it and
# exits 0 by itself; without it, the app must stay up for 10 s and log no traceback.
if "$app" gui --help 2>/dev/null | grep -q -- --smoke-test; then
  t=$(now)
  if timeout 120 "$app" gui --smoke-test >"$work/gui.log" 2>&1 && ! grep -q Traceback "$work/gui.log"; then
    report "gui --smoke-test (offscreen)" ok "$(elapsed "$t")"
  else
    report "gui --smoke-test (offscreen)" FAIL "$(elapsed "$t")" "$(grep -m1 -A3 Traceback "$work/gui.log" | tail -1)"
  fi
else
  t=$(now)
  timeout 20 "$app" gui >"$work/gui.log" 2>&1 &
  pid=$!
  sleep 10
  if kill -0 "$pid" 2>/dev/null && ! grep -q Traceback "$work/gui.log"; then
    report "gui stays up 10 s (offscreen)" ok "$(elapsed "$t")"
  else
    report "gui stays up 10 s (offscreen)" FAIL "$(elapsed "$t")" "$(tail -1 "$work/gui.log")"
  fi
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
fi

[ "$failed" = 0 ] && echo "smoke_test.sh: all checks passed" || echo "smoke_test.sh: some checks FAILED"
exit "$failed"
