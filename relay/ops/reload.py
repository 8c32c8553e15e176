"""SIGHUP reload, planned without side effects: what a new config changes
for a running node. The node applies the plan; what it cannot change
while running (arena size, ring shape, ports) is kept and reported."""
from __future__ import annotations

from dataclasses import dataclass, field

from relay.wire.config import NodeConfig, RoomConfig

# settings a running node keeps until it is restarted
RESTART_ONLY = ("listen", "admin", "ring_depth", "ring_bytes", "max_rooms", "speaker_slots", "workers",
                "quic", "quic_cert", "quic_key", "directory", "node_id", "tier", "advertise", "xdp")
# (the certificate files named by quic_cert and quic_key are read again on
# every reload, see QuicEndpoint.reload_certificate; their paths stay)


@dataclass
class ReloadPlan:
    notes: list[str] = field(default_factory=list)     # one line per change or refusal
    refused: bool = False
    remove: list[str] = field(default_factory=list)
    add: list[RoomConfig] = field(default_factory=list)
    sources: list[RoomConfig] = field(default_factory=list)   # allowed publishers changed
    rebind: list[RoomConfig] = field(default_factory=list)    # ingest address changed
    rules: list[RoomConfig] = field(default_factory=list)     # SRTP key or takeover rule changed
    upstream: list[RoomConfig] = field(default_factory=list)  # the nodes an upstream room comes from changed
    limits: list[RoomConfig] = field(default_factory=list)    # every kept room (its max_listeners)


def plan_reload(old: NodeConfig, new: NodeConfig, capacity: int, room_slots: int) -> ReloadPlan:
    """Compare the running config with `new` (which is edited to keep the
    restart-only settings). `capacity` is the arena's size, `room_slots` the
    rooms the core can hold."""
    plan = ReloadPlan()
    for key in RESTART_ONLY:
        if getattr(new, key) != getattr(old, key):
            plan.notes.append(f"{key} needs a restart; kept {getattr(old, key)!r}")
            setattr(new, key, getattr(old, key))
    if new.max_listeners > capacity:
        plan.notes.append(f"max_listeners above the arena ({capacity}) needs a restart")
        new.max_listeners = capacity
    if len(new.rooms) > room_slots:
        plan.notes.append("more rooms than max_rooms: reload refused")
        plan.refused = True
        return plan
    old_rooms = {r.name: r for r in old.rooms}
    new_rooms = {r.name: r for r in new.rooms}
    plan.remove = [name for name in old_rooms if name not in new_rooms]
    for name, r in list(new_rooms.items()):
        was = old_rooms.get(name)
        if was is None:
            plan.add.append(r)
            continue
        if _origin(was) != _origin(r):
            plan.notes.append(f"room {name!r}: switching between {_origin(was)} and {_origin(r)} needs a restart; "
                              "kept")
            new.rooms[new.rooms.index(r)] = was
            plan.limits.append(was)
            continue
        if (was.upstream, was.from_directory) != (r.upstream, r.from_directory):
            plan.upstream.append(r)
        if (was.sources, was.any_source) != (r.sources, r.any_source):
            if was.any_source != r.any_source:
                plan.notes.append(f"room {name!r}: switching '*' sources needs a restart")
            plan.sources.append(r)
        if was.ingest != r.ingest:
            plan.rebind.append(r)
        if (was.srtp_key, was.takeover_after, was.max_packet_rate, was.max_bitrate) != \
                (r.srtp_key, r.takeover_after, r.max_packet_rate, r.max_bitrate):
            plan.rules.append(r)
        plan.limits.append(r)
    return plan


def _origin(r: RoomConfig) -> str:
    """Where a room's audio comes from, one word."""
    return "upstream" if r.from_upstream else "speakers" if r.stage else "ingest"
