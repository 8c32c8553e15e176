"""`relay check` reports what on this machine limits a node and what to
change, from the machine's own figures."""
from __future__ import annotations

import resource
import subprocess
import sys


def _check(nofile: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    return subprocess.run([sys.executable, "-m", "relay", "check"], capture_output=True, text=True, timeout=30,
                          preexec_fn=limit)


def test_check_reports_the_machines_own_limits() -> None:
    p = _check()
    lines = {line.split()[1]: line for line in p.stdout.splitlines()}
    assert {"cores", "open", "net.core.wmem_max", "net.core.rmem_max", "memory", "libopus", "ffmpeg"} <= lines.keys()
    wmem = int(open("/proc/sys/net/core/wmem_max").read())
    assert f"net.core.wmem_max  {wmem} bytes" in lines["net.core.wmem_max"]
    assert lines["net.core.wmem_max"].startswith("ok" if wmem >= 8 << 20 else "change")
    assert p.returncode == (1 if any(line.startswith("change") for line in lines.values()) else 0)


def test_a_low_open_files_limit_is_named_with_the_fix() -> None:
    p = _check(nofile=256)
    line = next(x for x in p.stdout.splitlines() if " open files " in x)
    assert line.startswith("change") and "limit 256" in line and "LimitNOFILE=" in line
    assert p.returncode == 1
