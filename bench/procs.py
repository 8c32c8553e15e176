"""What the benchmarks read about a process they started (CPU seconds and
resident memory from /proc, a socket's drops from /proc/net/udp), where it
runs (which cores), and how it is stopped: every peer in a process group of
its own, every group stopped when the bench exits or is sent SIGINT/SIGTERM.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable

CLK = os.sysconf("SC_CLK_TCK")

# every process spawn() started and has not seen stopped
_STARTED: list[subprocess.Popen] = []


class Interrupted(BaseException):
    """The bench was sent SIGINT or SIGTERM; raised where it was, so that
    every `finally` on the way out runs and stops its peers. A
    BaseException, like KeyboardInterrupt, so that the benches' `except
    Exception` (a point that failed, recorded, the bench goes on) lets it
    through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_bytes(pid: int) -> int:
    """Resident memory of a process."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def udp_drops(inodes: Iterable[int]) -> int:
    """Datagrams the kernel dropped at these UDP sockets' receive queues so
    far (the last column of /proc/net/udp and udp6, per socket inode)."""
    want = set(inodes)
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if int(cols[9]) in want:
                    total += int(cols[-1])
    return total


def split_cores() -> tuple[set[int], set[int]]:
    """(the sender's cores, everyone else's): the first core this process may
    use for the sender alone, the rest for the bench, its crowd and its
    receivers. On one core both are that core (and nothing is apart)."""
    cores = sorted(os.sched_getaffinity(0))
    return {cores[0]}, set(cores[1:]) or {cores[0]}


def spawn(args: list[str], cores: set[int] | None = None, **popen: object) -> subprocess.Popen:
    """Popen in a new process group (so a stop takes whatever the peer
    started, and the terminal's Ctrl-C reaches only the bench), pinned to
    `cores` from before its first instruction (threads it starts inherit
    the mask), and remembered until stopped."""
    def pin() -> None:
        if cores:
            os.sched_setaffinity(0, cores)
    proc = subprocess.Popen(args, process_group=0, preexec_fn=pin if cores else None, **popen)  # type: ignore[call-overload]
    proc.own_group = True  # type: ignore[attr-defined]
    _STARTED.append(proc)
    return proc


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process's group if it leads one (spawn's), else to it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if getattr(proc, "own_group", False):
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)


def terminate(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to the process's group, SIGKILL to the group if the process
    has not gone in `grace` seconds; the group is killed either way, so
    nothing it started outlives it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    # a process that exited may leave children in its group
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ValueError):
        _STARTED.remove(proc)


def terminate_all(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """terminate() for many at once: every one is told together, so their
    shutdowns overlap instead of adding up."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(max(0.05, deadline - time.monotonic()))
    for p in procs:
        terminate(p, grace=0.0)


def stop_all(grace: float = 3.0) -> None:
    """Every group spawn() started and nobody stopped: SIGTERM, then SIGKILL
    after `grace` seconds."""
    terminate_all(list(_STARTED), grace)
    _STARTED.clear()


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted in the bench's main thread (its
    `finally` blocks stop their peers), and whatever is still running at
    exit is stopped too."""
    def on_signal(signum: int, _frame: object) -> None:
        # a second signal while stopping must not cut the stopping short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    atexit.register(stop_all)


def exit_code(e: Interrupted) -> int:
    """The shell's code for a process ended by this signal."""
    return 128 + e.signum


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group now."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                        pids.append(int(d))
            except (OSError, ValueError, IndexError):
                pass    # gone meanwhile
    return pids


def group_cpu_seconds(pgids: Iterable[int]) -> float:
    """User + system CPU time so far of every process now in these groups
    (a process that has exited meanwhile is not counted: read it while the
    group lives)."""
    total = 0.0
    for g in pgids:
        for pid in group_pids(g):
            with contextlib.suppress(OSError):
                total += cpu_seconds(pid)
    return total


def group_socket_inodes(pgids: Iterable[int]) -> set[int]:
    """The inodes of the sockets the processes of these groups hold open."""
    inodes: set[int] = set()
    for g in pgids:
        for pid in group_pids(g):
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:["):
                            inodes.add(int(link[8:-1]))
    return inodes


def pin_group(pgids: Iterable[int], cores: set[int]) -> None:
    """Move every thread of every process now in these groups to `cores`."""
    for g in pgids:
        for pid in group_pids(g):
            with contextlib.suppress(OSError):
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), cores)
