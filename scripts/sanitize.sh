#!/usr/bin/env bash
# Build the compiled modules with AddressSanitizer + UBSan (and the debug
# allocation counting) in a separate tree, then run the core's tests on it.
# Python itself is not instrumented, so libasan is preloaded and Python's
# allocator is switched to malloc so ASan sees every buffer.
set -euo pipefail
cd "$(dirname "$0")/.."
asan="$(gcc -print-file-name=libasan.so)"
[ -e "$asan" ] || { echo "sanitize: libasan not found (apt-get install gcc)"; exit 1; }
rm -rf build/asan && mkdir -p build/asan
cp -r relay tests setup.py pyproject.toml README.md build/asan/
rm -f build/asan/relay/*.so build/asan/relay/*.c
( cd build/asan && RELAY_DEBUG=1 RELAY_SANITIZE=1 ../../.venv/bin/python setup.py -q build_ext --inplace 2>&1 \
    | grep -E '(error|warning):' || true )
cd build/asan
RELAY_SANITIZED=1 LD_PRELOAD="$asan" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    PYTHONMALLOC=malloc ../../.venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_core_rings.py tests/test_core_model.py tests/test_core_egress.py tests/test_core_shards.py "$@"
