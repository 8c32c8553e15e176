"""How busy the node is, measured: the fan-out's duty cycle (busiest sender
thread, or the loop's inline fan-out), the event-loop thread's CPU share,
the machine's CPU and the relay's own share of it, whether the senders
fell behind, and the loop's lag. Admission reads these so that joins stop
before the node runs out of CPU, not after."""
from __future__ import annotations

import os
import time

# the senders have fallen behind when a packet takes longer than one 20 ms
# frame, on average over an interval, from ingest to its last listener:
# at that pace the next frame is due before this one is out
BEHIND_S = 0.020


def machine_cpu() -> tuple[int, int] | None:
    """(available, total) jiffies over all CPUs, from /proc/stat. Available
    is idle, iowait and niced time: niced work yields to the relay (at nice
    19 the scheduler gives it about 1.5 % against a nice-0 thread), so it is
    headroom, not load."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[1] + fields[3] + fields[4], sum(fields[:8])


class LoadMeter:
    """Turns cumulative busy counters into rates, once per housekeeping tick."""

    def __init__(self) -> None:
        self.duty = 0.0           # busiest sender, 0..1 of a core
        self.machine_busy = 0.0   # all CPUs, 0..1
        self.relay_share = 0.0    # this process's CPU time, as a fraction of all CPUs
        self.behind = False       # the fan-out fell behind the packet rate in the last interval
        self.loop_duty = 0.0      # the event-loop thread, 0..1 of a core
        self.loop_lag = 0.0       # seconds the loop woke late at the last probe
        self.interval_ns = 0      # length of the last measurement
        self._busy_seen: list[int] = []
        self._at = time.monotonic_ns()
        self._cpu_seen: tuple[int, int] | None = None
        self._loop_cpu_seen = time.thread_time_ns()
        self._process_cpu_seen = time.process_time_ns()
        self._latency_seen = (0, 0.0, 0)

    def measure(self, busy_ns: list[int], latency: tuple[int, float] = (0, 0.0), lagged: int = 0) -> bool:
        """Take a new reading of the senders' cumulative busy nanoseconds (one
        per sender), and of the fan-out latency's cumulative (count, sum in
        seconds) and of packets a sender thread skipped for lag. Must be
        called on the event-loop thread, whose CPU time is the loop's.
        Returns False for the first reading (no rate yet)."""
        now = time.monotonic_ns()
        cpu = machine_cpu()
        loop_cpu = time.thread_time_ns()
        process_cpu = time.process_time_ns()
        measured = bool(self._busy_seen) and now > self._at
        if measured:
            self.interval_ns = now - self._at
            self.duty = max(b - a for a, b in zip(self._busy_seen, busy_ns, strict=True)) / self.interval_ns
            self.machine_busy = 0.0
            if cpu and self._cpu_seen and cpu[1] > self._cpu_seen[1]:
                self.machine_busy = 1 - (cpu[0] - self._cpu_seen[0]) / (cpu[1] - self._cpu_seen[1])
            self.loop_duty = (loop_cpu - self._loop_cpu_seen) / self.interval_ns
            self.relay_share = (process_cpu - self._process_cpu_seen) / self.interval_ns / (os.cpu_count() or 1)
            count, total, lag = self._latency_seen
            packets = latency[0] - count
            self.behind = lagged > lag or (packets > 0 and (latency[1] - total) / packets > BEHIND_S)
        self._busy_seen, self._at, self._cpu_seen, self._loop_cpu_seen = busy_ns, now, cpu, loop_cpu
        self._process_cpu_seen, self._latency_seen = process_cpu, (latency[0], latency[1], lagged)
        return measured


# loop-thread share one QUIC listener costs before any has been measured:
# bench/quic.py measured 0.0044 of a core per listener at 50 packets/s when
# aioquic sent every datagram and read every ACK; on the core's QUIC path
# the loop only reads the ACKs the core ends, about 0.0001 (a profile of a
# node with 1,000 such listeners), guessed here with room to spare
SESSION_COST_GUESS = 0.005
PATH_SESSION_COST_GUESS = 0.0005


class QuicLoad:
    """QUIC's own admission rule. Handshakes, control streams and (on the
    QUIC path) the reads of the listeners' ACKs run on the loop thread, which
    also reads every room's ingest and answers every UDP join, so QUIC must
    not fill it: a full loop would starve listeners on every transport. The
    QUIC adapter adds the time it spends on joined sessions (add_busy)."""

    def __init__(self, guess: float = SESSION_COST_GUESS) -> None:
        self.guess = guess           # a session's cost until one is measured
        self.busy_ns = 0
        self.load = 0.0              # the loop thread's busy fraction at the last measurement
        self.load_sessions = 0       # QUIC sessions then
        self.cost_per_session = 0.0
        self._busy_seen = 0

    def add_busy(self, ns: int) -> None:
        self.busy_ns += ns

    def note(self, loop_duty: float, interval_ns: int, sessions: int) -> None:
        """The loop thread's busy fraction (0..1 of a core) over the last
        `interval_ns`, with `sessions` QUIC sessions; QUIC's share of it is
        what the adapter timed."""
        quic = (self.busy_ns - self._busy_seen) / max(1, interval_ns)
        self._busy_seen = self.busy_ns
        self.load, self.load_sessions = loop_duty, sessions
        self.cost_per_session = quic / sessions if sessions else 0.0

    def full(self, sessions: int, max_load: float) -> bool:
        """True when one more QUIC session (on top of `sessions`) would take
        the loop thread past `max_load` (0 = off): the measured load plus
        what each session admitted since costs."""
        if max_load <= 0:
            return False
        added = sessions + 1 - self.load_sessions
        cost = self.cost_per_session or self.guess
        return self.load + cost * max(1, added) > max_load
