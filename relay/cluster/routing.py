"""Where joiners go: this node's directory record, the redirect for a
listener it turns away, and the answer to GET /join."""
from __future__ import annotations

import random
from typing import Any, Sequence

from relay.cluster.directory import Directory, Peer
from relay.cluster.records import MAX_PARENTS, Record, record_key
from relay.wire.addr import parse_hostport
from relay.wire.config import NodeConfig


def node_record(cfg: NodeConfig, quic_port: int | None, quic_info: dict[str, Any] | None, rooms: list[str],
                listeners: int, load: float, draining: bool, parents: Sequence[str] = ()) -> Record:
    """This node's directory record: how to reach it, what it can take,
    which rooms it carries now (`rooms`) and from which nodes (`parents`),
    with the key derived from the cluster secret that its heartbeat signs
    it with (none in open auth)."""
    quic = webtransport = cert = ""
    if quic_port is not None and quic_info is not None and cfg.advertise:
        quic = f"{cfg.advertise.rpartition(':')[0]}:{quic_port}"
        webtransport = f"https://{quic}{quic_info['path']}"
        cert = quic_info["cert_sha256"] or ""
    return Record({"udp": cfg.advertise, "quic": quic, "webtransport": webtransport, "cert": cert,
                   "tier": cfg.tier, "capacity": cfg.max_listeners, "listeners": listeners,
                   "load": round(load, 4), "draining": draining, "rooms": rooms,
                   "parents": list(parents)[:MAX_PARENTS]}, record_key(cfg.secret))


def redirect(directory: Directory, cfg: NodeConfig, room: str, udp: bool) -> str:
    """A live node of this tier with room for a listener this node turns
    away: its UDP or its QUIC address; "" if there is none."""
    peer = directory.pick(room, tier=cfg.tier, exclude=cfg.advertise)
    if peer is None:
        return ""
    return peer.udp if udp else peer.quic


def alternates(directory: Directory, cfg: NodeConfig, room: str, rng: random.Random,
               count: int = 2) -> list[Peer]:
    """Up to `count` different live nodes a listener of `room` may move to
    if this node dies, in the order to try them, drawn as pick() draws
    (weighted by spare room) but not counted as joins: they are told to
    every new listener for a second, and most never go. Two, because nodes
    die together (a rack, a zone): a listener whose one alternate died with
    its node would have nowhere to go."""
    fits = directory.live(room, tier=cfg.tier, exclude=cfg.advertise)
    picked: list[Peer] = []
    while fits and len(picked) < count:
        peer = rng.choices(fits, weights=[p.spare for p in fits])[0]
        picked.append(peer)
        fits = [p for p in fits if p is not peer]
    return picked


def parents(directory: Directory, cfg: NodeConfig, room: str, rng: random.Random) -> list[tuple[str, int]]:
    """The nodes a room with upstream = "directory" may take its parents
    from, in the order its links try them: live nodes of the tier above
    this one (an edge's mids, else the origins; a mid's origins), those
    that carry the room first. The first is drawn weighted by spare room;
    the second is one whose own parents share none with the first's where
    the directory offers one (disjoint ancestry: one death above cannot
    cut both), so on an origin pair a mid gets one parent at each origin."""
    above = ("mid", "origin") if cfg.tier == "edge" else ("origin",)
    fits: list[Peer] = []
    for tier in above:
        fits = [p for p in directory.live(room, tier=tier, exclude=cfg.advertise) if p.tier == tier]
        if fits:
            break
    if tier == "origin":
        # an origin that does not carry the room cannot get it from anyone
        fits = [p for p in fits if room in p.rooms]
    order: list[Peer] = []
    if fits:
        first = rng.choices(fits, weights=[max(1, p.spare) for p in fits])[0]
        rest = [p for p in fits if p is not first]
        rest.sort(key=lambda p: (len(set(p.parents) & set(first.parents)), room not in p.rooms, -p.spare))
        order = [first, *rest]
    out = []
    for p in order:
        try:
            out.append(parse_hostport(p.udp))
        except ValueError:
            continue
    return out


def where_to_join(room: str, cfg: NodeConfig, me: dict[str, Any] | None,
                  directory: Directory | None, moves: Sequence[Peer] = ()) -> dict[str, Any]:
    """GET /join: this node (`me`, its record, if it would take a listener
    now), else the directory's pick; empty addresses if nobody can. Its
    `alternates` say where a page should move if the node it plays from
    dies: `moves` (this node's alternates for the room), those with
    WebTransport."""
    if me is not None and cfg.advertise:
        where = {"room": room, "node": cfg.node_id, "udp": me["udp"], "quic": me["quic"],
                 "webtransport": me["webtransport"], "cert_sha256": me["cert"]}
    else:
        peer = directory.pick(room, tier=cfg.tier, exclude=cfg.advertise) if directory is not None else None
        if peer is not None:
            where = {"room": room, "node": peer.id, "udp": peer.udp, "quic": peer.quic,
                     "webtransport": peer.webtransport, "cert_sha256": peer.cert}
        else:
            where = {"room": room, "node": "", "udp": "", "quic": "", "webtransport": "", "cert_sha256": ""}
    where["alternates"] = [{"node": p.id, "webtransport": p.webtransport, "cert_sha256": p.cert}
                           for p in moves if p.webtransport]
    return where
