"""Where joiners go: this node's directory record, the redirect for a
listener it turns away, and the answer to GET /join."""
from __future__ import annotations

from typing import Any

from relay.cluster.directory import Directory
from relay.cluster.records import Record, record_key
from relay.wire.config import NodeConfig


def node_record(cfg: NodeConfig, quic_port: int | None, quic_info: dict[str, Any] | None, rooms: list[str],
                listeners: int, load: float, draining: bool) -> Record:
    """This node's directory record: how to reach it, what it can take and
    which rooms it carries now (`rooms`), with the key derived from the
    cluster secret that its heartbeat signs it with (none in open auth)."""
    quic = webtransport = cert = ""
    if quic_port is not None and quic_info is not None and cfg.advertise:
        quic = f"{cfg.advertise.rpartition(':')[0]}:{quic_port}"
        webtransport = f"https://{quic}{quic_info['path']}"
        cert = quic_info["cert_sha256"] or ""
    return Record({"udp": cfg.advertise, "quic": quic, "webtransport": webtransport, "cert": cert,
                   "tier": cfg.tier, "capacity": cfg.max_listeners, "listeners": listeners,
                   "load": round(load, 4), "draining": draining, "rooms": rooms}, record_key(cfg.secret))


def redirect(directory: Directory, cfg: NodeConfig, room: str, udp: bool) -> str:
    """A live node of this tier with room for a listener this node turns
    away: its UDP or its QUIC address; "" if there is none."""
    peer = directory.pick(room, tier=cfg.tier, exclude=cfg.advertise)
    if peer is None:
        return ""
    return peer.udp if udp else peer.quic


def alternates(directory: Directory, cfg: NodeConfig, room: str, count: int = 2) -> str:
    """Up to `count` different live nodes a listener of `room` may move to
    if this node dies, in the order to try them ("a:p,b:p"; "" if none).
    Two, because nodes die together (a rack, a zone): a listener whose one
    alternate died with its node would have nowhere to go."""
    picked: list[str] = []
    for _ in range(2 * count):
        where = redirect(directory, cfg, room, udp=True)
        if where and where not in picked:
            picked.append(where)
        if len(picked) == count:
            break
    return ",".join(picked)


def where_to_join(room: str, cfg: NodeConfig, me: dict[str, Any] | None,
                  directory: Directory | None) -> dict[str, Any]:
    """GET /join: this node (`me`, its record, if it would take a listener
    now), else the directory's pick; empty addresses if nobody can."""
    if me is not None and cfg.advertise:
        return {"room": room, "node": cfg.node_id, "udp": me["udp"], "quic": me["quic"],
                "webtransport": me["webtransport"], "cert_sha256": me["cert"]}
    if directory is not None:
        peer = directory.pick(room, tier=cfg.tier, exclude=cfg.advertise)
        if peer is not None:
            return {"room": room, "node": peer.id, "udp": peer.udp, "quic": peer.quic,
                    "webtransport": peer.webtransport, "cert_sha256": peer.cert}
    return {"room": room, "node": "", "udp": "", "quic": "", "webtransport": "", "cert_sha256": ""}
