"""This node's view of the cluster, for its rooms: the alternates its
listeners are told to move to, the parents of rooms taken from the
directory, where a joiner it turns away goes, and what a mover's resume
point asks of a room's parents. Refreshed once a second from the
directory's local table; nothing here waits on the network."""
from __future__ import annotations

import random
from typing import Iterable

from relay.cluster import routing
from relay.cluster.directory import Directory, Peer
from relay.cluster.upstream import Upstream
from relay.wire.config import NodeConfig


class Neighbours:
    """The node's neighbours, as the directory shows them."""

    def __init__(self, directory: Directory | None, cfg: NodeConfig, upstreams: dict[str, Upstream]) -> None:
        self.directory, self.cfg, self.upstreams = directory, cfg, upstreams
        self.alternates: dict[str, list[Peer]] = {}     # room -> where its listeners go if we die
        self._at = 0.0
        self._rng = random.SystemRandom()

    def refresh(self, now: float, rooms: Iterable[str]) -> None:
        """Once a second: each room's alternates (the directory's picks),
        and the parents of rooms taken from the directory."""
        if self.directory is None or now - self._at < 1.0:
            return
        self._at = now
        for name in rooms:
            self.alternates[name] = routing.alternates(self.directory, self.cfg, name, self._rng)
        for name, up in self.upstreams.items():
            if up.from_directory:
                up.nodes = routing.parents(self.directory, self.cfg, name, self._rng)

    def alternate(self, room: str) -> str:
        """An ACCEPT's alternates: the directory's, else [node] redirect."""
        return ",".join(p.udp for p in self.alternates.get(room, ())) or self.cfg.redirect

    def route(self, room: str, transport: str) -> str:
        """A live node with room for a listener this node turns away."""
        assert self.directory is not None
        return routing.redirect(self.directory, self.cfg, room, udp=transport == "udp")

    def resumed(self, room: str, point: int) -> None:
        """A listener moved here with a resume point: a room taken from
        upstream that this node does not carry yet subscribes now, asking
        its parents for the room's history after that point."""
        up = self.upstreams.get(room)
        if up is not None:
            up.resume(point)

    def parents(self) -> list[str]:
        """The nodes this node hears rooms from now, for its record."""
        return sorted({f"{node[0]}:{node[1]}" for up in self.upstreams.values() for link in up.links
                       if (node := link.node) is not None})
