#!/usr/bin/env bash
# Build the compiled modules with a sanitizer (and the debug allocation
# counting) in a separate tree, then run the core's tests on it.
#
#   scripts/sanitize.sh            AddressSanitizer + UBSan (make sanitize)
#   scripts/sanitize.sh thread     ThreadSanitizer (make tsan)
#
# Python itself is not instrumented, so the sanitizer's runtime is preloaded
# and Python's allocator is switched to malloc so it sees every buffer. The
# interpreter's own locks (the GIL among them) are pthread calls, which the
# runtime intercepts, so TSan sees the happens-before edges Python provides.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-address}"
[ $# -gt 0 ] && shift
case "$mode" in
    address) lib=libasan.so ;;
    thread) lib=libtsan.so ;;
    *) echo "sanitize: unknown mode '$mode' (address or thread)"; exit 2 ;;
esac
runtime="$(gcc -print-file-name=$lib)"
[ -e "$runtime" ] || { echo "sanitize: $lib not found (apt-get install gcc)"; exit 1; }
tree="build/$mode"
rm -rf "$tree" && mkdir -p "$tree"
cp -r relay tests fuzz setup.py pyproject.toml README.md "$tree/"
find "$tree/relay" \( -name '*.so' -o -name '*.c' \) -delete
( cd "$tree" && RELAY_DEBUG=1 RELAY_SANITIZE="$mode" ../../.venv/bin/python setup.py -q build_ext --inplace 2>&1 \
    | grep -E '(error|warning):' || true )
cd "$tree"
core_tests=(tests/core/test_core_rings.py tests/core/test_core_model.py tests/core/test_core_egress.py tests/core/test_core_shards.py
            tests/core/test_core_safety.py tests/core/test_quic_seal.py tests/core/test_quic_path.py
            tests/core/test_gate.py tests/core/test_xdp.py)
# pytest captures only Python's sys.stderr (--capture=sys), never the file
# descriptor: a sanitizer that halts mid-test would otherwise take its report
# with it, leaving only "Fatal Python error: Aborted" (UBSan writes to fd 2
# whatever log_path says; ASan and TSan write to the report files). Any
# report fails the run.
report="$(pwd)/${mode}-report"
rm -f "$report".*
rc=0
if [ "$mode" = address ]; then
    RELAY_SANITIZED=1 LD_PRELOAD="$runtime" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$report" \
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$report" PYTHONMALLOC=malloc \
        ../../.venv/bin/python -m pytest -q -p no:cacheprovider --capture=sys "${core_tests[@]}" "$@" || rc=$?
else
    # TSan needs the low address space it reserves: with the kernel's full
    # mmap randomisation an uninstrumented host process can land on it, so
    # run without address randomisation.
    RELAY_SANITIZED=1 LD_PRELOAD="$runtime" PYTHONMALLOC=malloc \
        TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:log_path=$report" \
        setarch "$(uname -m)" -R ../../.venv/bin/python -m pytest -q -p no:cacheprovider --capture=sys "${core_tests[@]}" "$@" || rc=$?
fi
if ls "$report".* >/dev/null 2>&1; then
    cat "$report".*
    echo "$mode sanitizer: it reported the errors above"
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"
echo "$mode sanitizer: 0 reports"
