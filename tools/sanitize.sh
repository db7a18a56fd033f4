#!/usr/bin/env bash
# ASan + UBSan run of the C++ core (bcekit._core) over the test suite. Run from anywhere:
#   tools/sanitize.sh                  # the whole suite
#   tools/sanitize.sh tests/test_numpy.py -x -k logits   # extra pytest args replace/extend the selection
# Exits non-zero on a failing test or on any sanitizer report.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${BCEKIT_SANITIZE_VENV:-$root/.venv-sanitize}   # a separate environment: the dev install is untouched
log=$root/build/sanitize/pytest.log
reports=$root/build/sanitize/reports   # one file per process that reports: reports.<pid>
started=$(date +%s)

echo "sanitize.sh: $(git describe --always --dirty 2>/dev/null || echo 'not a git checkout')"

# 1. Environment: the test requirements minus `-e .`, then bcekit built non-editable with the sanitizers.
python3 -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install --quiet --upgrade pip
# (the copy lives in the venv: its -r includes are made absolute)
grep -vE '^\s*-e\s' requirements-test.txt | sed -E "s|^(\s*-r\s+)|\1$root/|" > "$venv/requirements-test-noneditable.txt"
"$py" -m pip install --quiet -r "$venv/requirements-test-noneditable.txt"
"$py" -m pip install --quiet --force-reinstall --no-deps . \
  -Ccmake.define.BCEKIT_SANITIZE=ON -Ccmake.build-type=RelWithDebInfo -Cbuild-dir=build/sanitize

# 2. Runtime. CPython is not instrumented, so the ASan runtime must be the first library loaded
# (LD_PRELOAD); libubsan is preloaded beside it so that UBSan, too, is set up before anything runs.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# detect_leaks=0: CPython, torch and jaxlib keep allocations until exit by design.
# abort_on_error=1: a report aborts the process (SIGABRT), so pytest cannot swallow it.
# log_path: ASan's reports go to files, since pytest captures fd 2 per test and loses it when the process
# aborts. GCC 12's UBSan writes to stderr whatever log_path says: hence pytest's --capture=sys below.
asan=detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1
export ASAN_OPTIONS=${ASAN_OPTIONS:-$asan:check_initialization_order=1:strict_init_order=1:log_path=$reports}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$reports}
export PYTHONFAULTHANDLER=1
# The output-buffer cache hands freed buffers out again, hiding use-after-free and double free from ASan.
export BCEKIT_CACHE_BYTES=${BCEKIT_CACHE_BYTES:-0}
mkdir -p "$(dirname "$log")"
rm -f "$reports".*
# The tests must import this build: the installed copy (pytest's importlib mode keeps src/ off sys.path).
core=$("$py" -c 'import bcekit._core as c, bcekit._native as n; print(c.__file__); assert n.ISA')
case $core in "$venv"/*) ;; *) echo "sanitize.sh: imported $core, not the sanitized build" >&2; exit 1 ;; esac
LD_PRELOAD='' ldd "$core" | grep -q libasan || { echo "sanitize.sh: $core lacks libasan" >&2; exit 1; }

# 3. The whole suite, or what "$@" selects.
status=0
"$py" -m pytest -p no:cacheprovider --capture=sys "$@" 2>&1 | tee "$log" || status=$?

# Any report fails the run, even one from a process that survived it (a subprocess, a recovered error).
if compgen -G "$reports.*" > /dev/null; then cat "$reports".* >&2; fi
if grep -qsE 'ERROR: (Address|Leak)Sanitizer|runtime error:|SUMMARY: \w*Sanitizer' "$log" "$reports".*; then
  echo "sanitize.sh: sanitizer report(s): $reports.*" >&2
  if [ "$status" -eq 0 ]; then status=1; fi
fi
echo "sanitize.sh: exit $status after $(( $(date +%s) - started )) s (log: $log)"
exit "$status"
