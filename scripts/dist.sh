#!/usr/bin/env bash
# `make dist`: the edge node as one self-contained executable, and the wheel.
#
#   build/dist/relay         PyInstaller --onefile: Python, relay, its compiled
#                            core and every Python dependency; needs only the
#                            system's libopus0 (and ffmpeg for `publish --file`)
#   build/wheel/*.whl        the wheel, built from the tracked files only
#
# Then both are checked: the wheel carries no generated C or Cython sources,
# and the executable, run from an empty directory with an empty environment
# (no venv, nothing on PYTHONPATH), serves a room that its own publisher
# feeds and its own listener hears.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
.venv/bin/pip install -q 'pyinstaller>=6.10' 2>&1 | { grep -E '^(ERROR|error)' || true; }

# the wheel, from a clean copy of what git tracks (no stale build products)
rm -rf build/wheel build/wheel-src && mkdir -p build/wheel-src
git ls-files -z | xargs -0 cp --parents -t build/wheel-src
( cd build/wheel-src && "$root/.venv/bin/pip" wheel . --no-deps --no-build-isolation -q -w "$root/build/wheel" 2>&1 \
    | { grep -E '^(ERROR|error)' || true; } )
wheel="$(ls build/wheel/*.whl)"
sources="$(.venv/bin/python -c 'import sys, zipfile; print(" ".join(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith((".c", ".pyx", ".pxi", ".pxd"))))' "$wheel")"
[ -z "$sources" ] || { echo "dist: the wheel carries sources: $sources"; exit 1; }
echo "dist: $wheel (compiled modules, no C or Cython sources)"

.venv/bin/pyinstaller --onefile --name relay --noconfirm --log-level ERROR \
    --distpath build/dist --workpath build/pyinstaller --specpath build/pyinstaller --paths "$root" \
    --add-data "$root/relay/listeners/static:relay/listeners/static" \
    --collect-submodules relay --collect-submodules uvloop --collect-submodules aioquic --collect-submodules av \
    deploy/dist/relay_main.py 2>&1 | { grep -v -e SyntaxWarning -e 'is not 0' || true; }
echo "dist: build/dist/relay ($(du -h build/dist/relay | cut -f1))"

# run it the way a fresh machine would: no venv, empty environment
bin="$root/build/dist/relay"
run="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$run"' EXIT
read -r listen admin ingest < <(python3 -c '
import socket
def free(kind):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]
print(free(socket.SOCK_DGRAM), free(socket.SOCK_STREAM), free(socket.SOCK_DGRAM))')
cat > "$run/node.toml" <<TOML
[node]
listen = "127.0.0.1:$listen"
admin = "127.0.0.1:$admin"
auth = "open"
drain_grace = 0
# a smoke run on a shared CI machine: a busy neighbour must not refuse our listener
max_load = 0
max_machine_load = 0
[[room]]
name = "edge"
ingest = "127.0.0.1:$ingest"
sources = ["127.0.0.1"]
TOML
cd "$run"
env -i PATH=/usr/bin:/bin "$bin" serve -c node.toml > serve.log 2>&1 &
for _ in $(seq 150); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$admin/readyz', timeout=1)" 2>/dev/null && break
    sleep 0.2
done
env -i PATH=/usr/bin:/bin "$bin" publish --to "127.0.0.1:$ingest" --duration 10 2> publish.log &
status=0
env -i PATH=/usr/bin:/bin "$bin" listen --server "127.0.0.1:$listen" --room edge --duration 3 --out heard.ogg 2> listen.log \
    || status=$?
received="$(sed -n 's/^received \([0-9]*\) packets.*/\1/p' listen.log)"
if [ "${received:-0}" -lt 100 ]; then
    echo "dist: the executable's listener heard ${received:-0} packets (listen exited $status)"
    cat serve.log listen.log publish.log; exit 1
fi
echo "dist: build/dist/relay served a room from an empty environment: its listener heard $received packets"
