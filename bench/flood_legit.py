"""The flood bench's legitimate side: a publisher and the listeners whose
fate the flood must not decide.

`Legit` runs in a thread of the bench: it keeps `n` UDP sessions joined to
the node (each on its own loopback address), sends their KEEPALIVEs on the
node's interval, counts the audio they receive by RTP sequence number, and
every `join_every` seconds joins one more listener from a fresh address,
timing the whole handshake (JOIN, CHALLENGE, JOIN+cookie, ACCEPT, with the
client's retransmissions), then leaves. A step's `Tally` says what broke.
Every loop is bounded by the step's deadline.
"""
from __future__ import annotations

import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from relay.wire.protocol import (Accept, Challenge, Join, Keepalive, Leave, ProtocolError, Reason, Reject,
                                 decode, encode)

RETRANSMIT_S = 0.25     # a joiner asks again after this long without an answer (as `relay listen` does)
JOIN_GIVE_UP_S = 3.0    # a join not done by then is counted failed (the goal is 1 s)
TAIL = 5                # packets (100 ms) a listener may still be waiting for at the end of a step


@dataclass
class Tally:
    """What the legitimate side saw during one step."""
    expired: int = 0              # sessions the node ended (REJECT unknown_session to a KEEPALIVE)
    keepalives: int = 0
    echoes: int = 0               # KEEPALIVEs the node answered
    audio: int = 0                # packets received by the established listeners
    lost: int = 0                 # holes in their sequence numbers
    joins: list[float] = field(default_factory=list)   # seconds per fresh join (JOIN_GIVE_UP_S: failed)
    failed_joins: int = 0

    def summary(self) -> dict:
        """The step's figures, JSON-ready."""
        js = sorted(self.joins)
        def q(p: float) -> float | None:
            return round(js[min(len(js) - 1, int(p * len(js)))], 3) if js else None
        return {"expired": self.expired, "keepalives": self.keepalives, "echoes": self.echoes,
                "audio": self.audio, "lost": self.lost, "joins": len(js), "failed_joins": self.failed_joins,
                "join_p50_s": q(0.5), "join_p99_s": q(0.99), "join_max_s": round(js[-1], 3) if js else None}


class Published:
    """How many packets the publisher has sent (its thread writes, the listeners read)."""
    count = 0


def publisher(port: int, stop: threading.Event, published: Published, pps: int = 50) -> threading.Thread:
    """A thread sending RTP/Opus-shaped packets to the room's ingest port at
    `pps` until `stop` (the core passes one speaker through unchanged)."""
    def run() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        seq, t = 0, time.monotonic()
        while not stop.is_set():
            # the payload carries the publisher's own count: the node renumbers
            # the RTP header per listener, so only this shows what never arrived
            s.sendto(struct.pack("!BBHIII", 0x80, 111, seq & 0xFFFF, seq * 960, 0x1234, seq) + bytes(76),
                     ("127.0.0.1", port))
            seq += 1
            published.count = seq
            t += 1 / pps
            time.sleep(max(0.0, t - time.monotonic()))
        s.close()
    th = threading.Thread(target=run, name="publisher", daemon=True)
    th.start()
    return th


class Listener:
    """One legitimate UDP listener socket on its own loopback address."""

    def __init__(self, addr: str, node: tuple[str, int]) -> None:
        self.node = node
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((addr, 0))
        self.sock.setblocking(False)
        self.session: Accept | None = None
        self.last_seq: int | None = None

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.node)
        except OSError:
            pass   # the retransmission covers it

    def join(self, room: str, token: str, give_up: float = JOIN_GIVE_UP_S) -> float | None:
        """The whole handshake; seconds it took, None if not done in `give_up`."""
        t0 = time.monotonic()
        hello = encode(Join(room, token))
        msg, asked = hello, 0.0
        while (now := time.monotonic()) < t0 + give_up:
            if now >= asked + RETRANSMIT_S:
                self.send(msg)
                asked = now
            select.select([self.sock], [], [], 0.02)
            for _ in range(64):
                try:
                    data = self.sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                if data and data[0] == 0x0B:
                    try:
                        m = decode(data)
                    except ProtocolError:
                        continue
                    if isinstance(m, Challenge):
                        msg, asked = encode(Join(room, token, m.cookie)), 0.0
                    elif isinstance(m, Accept):
                        self.session = m
                        return time.monotonic() - t0
                    elif isinstance(m, Reject) and m.reason != Reason.RATE_LIMITED:
                        return None
        return None

    def close(self) -> None:
        if self.session is not None:
            self.send(encode(Leave(self.session.session_id)))
        self.sock.close()


class Legit:
    """`n` established listeners plus a fresh joiner every `join_every` s."""

    def __init__(self, node: tuple[str, int], room: str, token: str, published: Published, n: int = 5,
                 keepalive_s: float = 1.0, join_every: float = 0.5) -> None:
        self.node, self.room, self.token, self.published = node, room, token, published
        self.keepalive_s, self.join_every = keepalive_s, join_every
        self.listeners = [Listener(f"127.2.0.{i + 1}", node) for i in range(n)]
        self._fresh = 0

    def join_all(self) -> bool:
        """Join the established listeners before the flood; True if all did."""
        return all(listener.join(self.room, self.token, give_up=5.0) is not None for listener in self.listeners)

    def _fresh_join(self, tally: Tally) -> None:
        self._fresh += 1
        joiner = Listener(f"127.2.{1 + self._fresh // 250 % 200}.{1 + self._fresh % 250}", self.node)
        took = joiner.join(self.room, self.token)
        joiner.close()
        if took is None:
            tally.failed_joins += 1
            took = JOIN_GIVE_UP_S
        tally.joins.append(took)

    def step(self, seconds: float) -> Tally:
        """Run for `seconds`; what the legitimate side saw."""
        tally = Tally()
        end = time.monotonic() + seconds
        next_ka = next_join = time.monotonic()
        by_fd = {lst.sock.fileno(): lst for lst in self.listeners}
        while (now := time.monotonic()) < end:
            if now >= next_ka:
                next_ka = now + self.keepalive_s
                for lst in self.listeners:
                    if lst.session is not None:
                        lst.send(encode(Keepalive(lst.session.session_id)))
                        tally.keepalives += 1
            if now >= next_join:
                self._fresh_join(tally)
                next_join = time.monotonic() + self.join_every
                continue
            r, _, _ = select.select(list(by_fd), [], [], 0.02)
            for fd in r:
                self._drain(by_fd[fd], tally)
        # what a listener has not got by the end and never will (its session
        # ended) is lost too; TAIL packets are allowed to be still on the way
        newest = self.published.count - 1 - TAIL
        for lst in self.listeners:
            if lst.last_seq is not None and lst.last_seq < newest:
                tally.lost += newest - lst.last_seq
                lst.last_seq = newest
        return tally

    def _drain(self, lst: Listener, tally: Tally) -> None:
        for _ in range(256):
            try:
                data = lst.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) >= 16 and 128 <= data[0] <= 191:
                seq = struct.unpack_from("!I", data, 12)[0]   # the publisher's count (publisher())
                if lst.last_seq is not None:
                    if seq <= lst.last_seq:
                        continue   # a resent or reordered packet
                    tally.lost += seq - lst.last_seq - 1
                lst.last_seq = seq
                tally.audio += 1
            elif data and data[0] == 0x0B:
                self._control(lst, data, tally)

    def _control(self, lst: Listener, data: bytes, tally: Tally) -> None:
        try:
            m = decode(data)
        except ProtocolError:
            return
        if isinstance(m, Keepalive):
            tally.echoes += 1
        elif isinstance(m, Reject) and m.reason == Reason.UNKNOWN_SESSION and lst.session is not None:
            tally.expired += 1
            # last_seq stays: what it missed while out counts as lost
            lst.session = None
            lst.join(self.room, self.token)   # back for the next step

    def close(self) -> None:
        for lst in self.listeners:
            lst.close()
