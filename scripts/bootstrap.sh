#!/usr/bin/env bash
# Install what relay needs on a fresh Debian machine, then build it into .venv.
# `bootstrap.sh test` also installs what the test suite runs against
# (a real Prometheus server, headless Chromium). Idempotent: fast when everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
if [ "${1:-}" = "test" ] || [ "${1:-}" = "bench" ]; then
    command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
    # the bench's peers (GStreamer multiudpsink) and instruction counts (valgrind)
    [ -e /usr/lib/x86_64-linux-gnu/gstreamer-1.0/libgstudp.so ] || [ -n "$(find /usr/lib -name libgstudp.so 2>/dev/null | head -1)" ] \
        || missing+=(gstreamer1.0-tools gstreamer1.0-plugins-good)
    /usr/bin/python3 -c "import gi; gi.require_version('Gst', '1.0')" 2>/dev/null \
        || missing+=(python3-gi gir1.2-gstreamer-1.0)
    command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
fi
if [ "${1:-}" = "test" ]; then
    # the cluster directory's tests run a real Redis
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    # and Redis Sentinel, to fail the directory's master over under the nodes
    command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
    # GStreamer's srtpenc, an SRTP publisher the tests use
    [ -n "$(find /usr/lib -name libgstsrtp.so 2>/dev/null | head -1)" ] || missing+=(gstreamer1.0-plugins-bad)
    # the web listener's test drives a real headless browser
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    # the listener page is tested in Firefox ESR too (WebDriver BiDi: tests/firefox.py)
    command -v firefox-esr >/dev/null 2>&1 || missing+=(firefox-esr)
    # LL-HLS is tested behind a real caching proxy, as a CDN would pull it
    command -v nginx >/dev/null 2>&1 || missing+=(nginx)
    # make deploy-check verifies the systemd unit with systemd-analyze
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
fi
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
ldconfig -p 2>/dev/null | grep -q 'libopus\.so\.0' || missing+=(libopus0)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
# the core seals QUIC packets with libcrypto: its headers to build
[ -e /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
python3 -c 'import sysconfig,os,sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || missing+=(python3-dev)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: installing Debian packages: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.relay-deps
want="$(cat pyproject.toml setup.py | sha1sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/pip install -q --upgrade pip setuptools wheel cython
    # setuptools' deprecation banners are noise here; real errors still fail the step
    .venv/bin/pip install -q -e '.[test]' 2>&1 | { grep -E '^(ERROR|error)' || true; }
    .venv/bin/python -c 'import relay._core'
    echo "$want" > "$stamp"
fi
# the listener page's LL-HLS player for browsers without native HLS: hls.js
# at a pinned version and hash, from npm, served by the node itself (never
# from a third-party host at run time)
HLSJS_VERSION=1.7.4
HLSJS_SHA256=cfc70cc9e9fc63d071919e087670abc760c8fd1bc889b88588026e4d22193bbe
hlsjs=relay/listeners/static/hls.min.js
if ! echo "$HLSJS_SHA256  $hlsjs" | sha256sum -c --quiet - >/dev/null 2>&1; then
    command -v npm >/dev/null 2>&1 || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"; \
        $SUDO apt-get update -qq; DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null; }
    tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack -q "hls.js@$HLSJS_VERSION" >/dev/null)
    tar xzf "$tmp/hls.js-$HLSJS_VERSION.tgz" -C "$tmp" package/dist/hls.min.js
    echo "$HLSJS_SHA256  $tmp/package/dist/hls.min.js" | sha256sum -c --quiet -
    cp "$tmp/package/dist/hls.min.js" "$hlsjs"
    rm -rf "$tmp"
fi
# rebuild the compiled modules when their sources changed
.venv/bin/python setup.py -q build_ext --inplace 2>&1 | grep -v -e '^$' -e 'BetaConfiguration' -e 'warnings.warn' || true
