"""`relay check`: what on this machine limits a node with this config, and
what to change. Read-only: it looks at limits, sysctls and libraries, and
opens no port."""
from __future__ import annotations

import ctypes.util
import os
import resource
import shutil
from dataclasses import dataclass

from relay.wire.sockets import SOCKET_BUFFER
from relay.wire.config import NodeConfig, arena_bytes


@dataclass
class Finding:
    what: str
    ok: bool
    detail: str


def _sysctl(name: str) -> int | None:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def findings(cfg: NodeConfig) -> list[Finding]:
    """One finding per thing that can limit the node."""
    out = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out.append(Finding("cores", cfg.workers <= cores,
                       f"{cores} usable, {cfg.workers} sender threads configured"
                       + ("" if cfg.workers <= cores else ": more threads than cores only adds switching; "
                                                          "set [node] workers = \"auto\"")))
    # listeners share one socket; files go to admin connections (256 at most),
    # QUIC connections not yet joined, ingest sockets and the log
    need = 256 + cfg.quic_max_pending + len(cfg.rooms) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out.append(Finding("open files", soft >= need,
                       f"limit {soft} (hard {hard}), the node may hold about {need} files open at once"
                       + ("" if soft >= need else f": raise it (LimitNOFILE= in the systemd unit, ulimit -n {need})")))
    for name in ("net.core.wmem_max", "net.core.rmem_max"):
        value = _sysctl(name)
        ok = value is not None and value >= SOCKET_BUFFER
        out.append(Finding(name, ok, f"{value} bytes; the listener socket asks for {SOCKET_BUFFER}"
                           + ("" if ok else f": sysctl -w {name}={SOCKET_BUFFER} (deploy/sysctl/90-relay.conf) "
                                            "or the kernel silently gives less")))
    arena = arena_bytes(cfg)
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    out.append(Finding("memory", arena <= memory // 2,
                       f"{arena / 2**20:.0f} MiB of listener arena for max_listeners = {cfg.max_listeners}, "
                       f"{memory / 2**30:.1f} GiB here" + ("" if arena <= memory // 2 else
                                                            ": lower max_listeners or ring_bytes")))
    opus = ctypes.util.find_library("opus")
    out.append(Finding("libopus", opus is not None,
                       opus or "not found: relay publish --tone needs it (Debian: apt-get install libopus0)"))
    ffmpeg = shutil.which("ffmpeg")
    out.append(Finding("ffmpeg", ffmpeg is not None,
                       ffmpeg or "not found: relay publish --file needs it (Debian: apt-get install ffmpeg)"))
    return out


def report(cfg: NodeConfig) -> int:
    """Print the findings; 0 when nothing needs changing, 1 otherwise."""
    results = findings(cfg)
    width = max(len(f.what) for f in results)
    for f in results:
        print(f"{'ok    ' if f.ok else 'change'}  {f.what:<{width}}  {f.detail}")
    return 0 if all(f.ok for f in results) else 1
