"""The throughput bench's receivers: bench/recv.c reading the listener
sockets the bench opened, pinned off the sender's core, and what they tell
about a window (datagrams read, their CPU, what the kernel dropped at their
sockets), so a point says whether the crowd kept up before a ratio is made
of it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from procs import cpu_seconds, spawn, terminate, udp_drops

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"

# a point whose receivers dropped more than this share of what was sent to
# them, or used more than this share of their cores, did not keep up
MAX_DROP_RATIO = 0.001
MAX_CPU_SHARE = 0.9


def build(name: str, libs: tuple[str, ...] = ()) -> str:
    """Compile bench/NAME.c into bench/build/NAME (once per source change)."""
    BUILD.mkdir(exist_ok=True)
    src, out = HERE / f"{name}.c", BUILD / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src), *libs], check=True)
    return str(out)


class Receivers:
    """One recv process over `socks`, on `cores`, sweeping every `interval_ms`."""

    def __init__(self, socks: list[socket.socket], cores: set[int], interval_ms: int = 20) -> None:
        self.cores = cores
        self.inodes = [os.fstat(s.fileno()).st_ino for s in socks]
        fds = [s.fileno() for s in socks]
        fd_file = Path(tempfile.mkdtemp()) / "fds.txt"
        fd_file.write_text("".join(f"{fd}\n" for fd in fds))
        self.proc = spawn([build("recv"), str(fd_file), str(interval_ms)], cores=cores, pass_fds=fds,
                          stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("ready"):
            terminate(self.proc)
            raise RuntimeError(f"bench/recv did not start: {line!r}")
        self._mark: tuple[int, float, int] | None = None

    def received(self) -> int:
        """Datagrams read so far."""
        self.proc.send_signal(signal.SIGUSR1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return int(line.split()[1]) if line.startswith("received") else 0

    def mark(self) -> None:
        """The start of a measured window."""
        self._mark = (self.received(), cpu_seconds(self.proc.pid), udp_drops(self.inodes))

    def since_mark(self, seconds: float, sent: float) -> dict:
        """The window since mark(): read, dropped and CPU, and whether the
        receivers kept up with the `sent` datagrams addressed to them."""
        assert self._mark is not None
        got0, cpu0, drop0 = self._mark
        got, cpu, drops = self.received() - got0, cpu_seconds(self.proc.pid) - cpu0, udp_drops(self.inodes) - drop0
        cores = cpu / max(1e-9, seconds)
        drop_ratio = drops / max(1.0, sent)
        kept_up = drop_ratio <= MAX_DROP_RATIO and cores <= MAX_CPU_SHARE * len(self.cores)
        return {"receivers_read_per_s": got / max(1e-9, seconds), "receivers_cpu_cores": cores,
                "receivers_dropped": drops, "receivers_drop_ratio": drop_ratio, "receivers_kept_up": kept_up}

    def close(self) -> None:
        terminate(self.proc, grace=2.0)
