"""What the admin port says of each room: /rooms (listeners, bitrate in,
loss and drops from the publisher) and the links on /."""
from __future__ import annotations

import time
from typing import Any

from relay._core import Core
from relay.listeners.sessions import PULLED, UDP, RoomState, Sessions
from relay.stage.stages import Stages

DROP_KINDS = ("foreign", "malformed", "oversized", "late")


class RoomRates:
    """Each room's incoming bitrate, over windows of about a second."""

    def __init__(self) -> None:
        self.bps: dict[str, float] = {}                         # room -> bits/s in
        self._seen: dict[str, tuple[float, int]] = {}           # room -> (when, bytes_in)

    def measure(self, now: float, stats: dict[str, dict[str, Any]]) -> None:
        """Take each room's bytes_in from the core's room stats at `now`."""
        for name, st in stats.items():
            got = st["bytes_in"]
            then, seen = self._seen.setdefault(name, (now, got))
            if now - then >= 1.0:
                self.bps[name] = 8 * (got - seen) / (now - then)
                self._seen[name] = (now, got)

    def forget(self, name: str) -> None:
        """A room was removed."""
        self.bps.pop(name, None)
        self._seen.pop(name, None)


def room_list(core: Core, rooms: dict[str, RoomState], sessions: Sessions, stages: Stages,
              rates: RoomRates) -> list[dict[str, Any]]:
    """GET /rooms: one entry per room."""
    now = time.monotonic_ns()
    out = []
    for r in rooms.values():
        st = core.room_stats(r.index)
        received = st["packets_in"] + st["seq_gaps"]
        out.append({
            "name": r.name, "listeners": st["listeners"],
            "by_transport": {t: sessions.listeners(r.name, t) for t in (UDP, *PULLED)},
            "packets_in": st["packets_in"],
            "bitrate_in_bps": round(rates.bps.get(r.name, 0.0)),
            # publisher to node: sequence numbers that never arrived
            "loss_in": st["seq_gaps"] / received if received else 0.0,
            "drops_in": {k: st[f"drop_{k}"] for k in DROP_KINDS},
            "publisher_silent_s": (now - st["last_rx_ns"]) / 1e9 if st["have_stream"] else None})
        if stages.has(r.name):
            out[-1]["stage"] = stages.describe(r.name)
    return out


def index_links(room_names: list[str]) -> list[tuple[str, str]]:
    """What the admin port's / links to."""
    links = [(f"/listen?room={name}", f"listen to {name} in this browser") for name in room_names]
    return links + [("/rooms", "rooms: listeners, bitrate, loss, drops"), ("/metrics", "Prometheus metrics"),
                    ("/healthz", "alive"), ("/readyz", "ready for new listeners"),
                    ("/quic.json", "QUIC and WebTransport address")]
