"""`relay serve`: one node, wired together.

The data path runs through the parts in the order packets travel: the UDP
adapter's ingest sockets feed the compiled core (relay/_core.pyx), which
fans out into listener rings and sends with sendmmsg, on the loop thread
(inline, one worker) or on sender threads (one per shard). The QUIC adapter
pulls QUIC listeners' rings. Around it: the session policy (who may join),
the load measure admission reads, the admin HTTP port and its metrics,
SIGHUP reload and SIGTERM drain. This module owns their lifecycle and
passes each part only what it needs.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import time
from functools import partial
from ipaddress import ip_address
from typing import Any, Callable, Iterator

from prometheus_client import generate_latest

from relay import __version__
from relay._core import Core
from relay.ops.admin import AdminServer, AdminViews
from relay.cluster.directory import Directory
from relay.ops.events import EventLog, emit
from relay.listeners.load import LoadMeter
from relay.ops.metrics import Cluster, NodeCollector, registry_for
from relay.listeners.quic.endpoint import QuicEndpoint
from relay.ops.reload import plan_reload
from relay.listeners.senders import SenderThreads
from relay.listeners.sessions import PULLED, UDP, RoomState, Sessions, Tell
from relay.stage.stages import Stages
from relay.listeners.udp import UdpPorts
from relay.cluster.upstream import Upstream, relay_token
from relay.wire.addr import to_sockaddr
from relay.wire.config import NodeConfig, RoomConfig
from relay.wire.tokens import Auth

log = logging.getLogger("relay.server")

HOUSEKEEPING_S = 0.25
DRAIN_STEP_S = 0.1       # one batch of listeners moved per step


class BindError(OSError):
    """A socket the config names could not be bound; the message names the
    setting, the address and the fix."""


def _origin(r: RoomConfig) -> str:
    """Where a room's audio comes from, for the start-up line."""
    if r.stage:
        return f"up to {r.max_speakers} speakers"
    if r.ingest is None:
        return "upstream " + ", ".join(f"{h}:{p}" for h, p in r.upstream)
    return f"{r.ingest[0]}:{r.ingest[1]}"


@contextlib.contextmanager
def _binding(setting: str, addr: tuple[str, int], flag: str) -> Iterator[None]:
    try:
        yield
    except BindError:
        raise
    except OSError as e:
        hint = {errno.EADDRINUSE: f"another program has it: choose a free port ({setting.split(':')[0]} or {flag})",
                errno.EADDRNOTAVAIL: "this machine has no such address",
                errno.EACCES: "ports below 1024 need privileges"}.get(e.errno or 0, "")
        raise BindError(e.errno, f"{setting} {addr[0]}:{addr[1]}: {e.strerror or e}"
                        + (f"; {hint}" if hint else "")) from None


class Node:
    """One relay node: rooms, the core, sessions and their sockets."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        # the arena and the room table are sized once; a reload works within
        # them. Rooms past max_rooms carry speakers' mix-minus streams.
        self.core = Core(cfg.max_listeners, rooms=cfg.max_rooms + cfg.speaker_slots, depth=cfg.ring_depth,
                         ring_bytes=cfg.ring_bytes, shards=cfg.workers, threaded=cfg.workers > 1)
        self.rooms: dict[str, RoomState] = {}
        self.sessions = Sessions(self.core, cfg, self.rooms, Auth(cfg.auth, cfg.secret))
        self.load = LoadMeter()
        self.senders = SenderThreads(self.core)
        self.udp = UdpPorts(self.core, self.sessions)
        self.stages = Stages(self.core, list(range(cfg.max_rooms + cfg.speaker_slots - 1, cfg.max_rooms - 1, -1)),
                             self._sent, os.urandom, emit)
        self.sessions.stages = self.stages
        self.quic: QuicEndpoint | None = QuicEndpoint(self.core, self.sessions) if cfg.quic else None
        self.events = EventLog(self.core, self.sessions, cfg.log_interval)
        self.started = time.monotonic()
        self.collector = NodeCollector(self.core, self.sessions, self.load, self.senders,
                                       lambda: self.quic.counters if self.quic else None, self.started,
                                       self.udp.srtp_drops, self._cluster, self.stages)
        self.admin = AdminServer(AdminViews(
            metrics=lambda: generate_latest(registry_for(self.collector)),
            not_ready=self._not_ready, rooms=self._room_list, index=self._index, release=self._release,
            join=self._where_to_join,
            quic=self.quic.describe if self.quic else None))
        self._free_rooms = list(range(cfg.max_rooms - 1, -1, -1))
        self._tasks: list[asyncio.Task] = []
        self.upstreams: dict[str, Upstream] = {}                 # rooms taken from other nodes
        self.directory: Directory | None = None
        if cfg.directory:
            self.directory = Directory(cfg.directory, cfg.node_id, self._describe)
            self.sessions.route = self._route
        self._rates: dict[str, float] = {}                      # room -> bits/s in
        self._rate_seen: dict[str, tuple[float, int]] = {}      # room -> (when, bytes_in)
        for r in cfg.rooms:
            self._open_room(r)

    # what tests and benchmarks read
    @property
    def listen_addr(self) -> tuple:
        assert self.udp.listen_sock is not None
        return self.udp.listen_sock.getsockname()

    @property
    def shard_restarts(self) -> int:
        return self.senders.restarts

    @property
    def threads(self) -> list:
        return self.senders.threads

    def _open_room(self, r: RoomConfig) -> RoomState:
        index = self._free_rooms.pop()
        state = RoomState(r.name, index, r.max_listeners)
        if r.stage:
            self.stages.open(r, index)
            self.rooms[r.name] = state
            if r.ingest is not None:   # its publishers go on the stage beside the speakers
                self.udp.to_stage[r.name] = partial(self.stages.on_ingest, r.name)
                self._publish_rules(state, r)
            return state
        # a room from upstream is fed only by this node's own subscription
        self.core.room_open(index, r.any_source or bool(r.upstream))
        if r.upstream:
            self.upstreams[r.name] = Upstream(r.name, index, r.upstream, self.core,
                                              lambda: relay_token(self.cfg.secret, r.name), self._sent)
        self.rooms[r.name] = state
        self._allow_sources(state, r)
        return state

    def _allow_sources(self, state: RoomState, r: RoomConfig) -> None:
        self.core.room_clear_sources(state.index)
        for host, port in r.sources:
            self.core.room_allow(state.index, to_sockaddr((host, port)), any_port=(port == 0))
        self._publish_rules(state, r)

    def _publish_rules(self, state: RoomState, r: RoomConfig) -> None:
        """Who may publish and who may replace the live stream. With an SRTP
        key, packets must authenticate, and a new stream may take over after
        a short silence: it holds the key. Without one, the live stream is
        its SSRC and its address, and another may take over only after a
        BYE from it, the operator's release, or takeover_after seconds of
        silence if the operator chose that."""
        takeover = -1.0 if r.takeover_after is None else r.takeover_after
        self.core.room_rules(state.index, takeover, pin_source=not r.srtp_key)
        allowed = {(ip_address(h), p) for h, p in r.sources}

        def allowed_source(addr: tuple) -> bool:
            ip = ip_address(addr[0].partition("%")[0])
            return r.any_source or (ip, 0) in allowed or (ip, addr[1]) in allowed
        self.udp.use_srtp(r.name, r.srtp_key, allowed_source)

    async def start(self) -> None:
        """Bind every socket and start serving. Raises OSError if a port is taken."""
        loop = asyncio.get_running_loop()
        try:
            with _binding("[node] listen", self.cfg.listen, "--listen"):
                self.udp.bind_listener(self.cfg.listen)
            for r in self.cfg.rooms:
                if r.ingest is not None:
                    with _binding(f"room {r.name!r}: ingest", r.ingest, "--room"):
                        self.udp.bind_ingest(r.name, self.rooms[r.name].index, r.ingest)
            if self.cfg.admin:
                with _binding("[node] admin", self.cfg.admin, "--admin"):
                    await self.admin.start(*self.cfg.admin)
            if self.quic is not None:
                with _binding("[node] quic", self.quic.addr, "--quic"):
                    await self.quic.start()
        except OSError:
            self.close()
            raise
        self.udp.start(loop)
        self.stages.start(loop)
        self.senders.start(self.udp.out_fd)
        self._tasks = [asyncio.create_task(self._housekeeping())]
        if self.directory is not None:
            self.directory.start()
        log.info("relay %s listening on %s, rooms: %s, auth: %s", __version__, self.listen_addr[:2],
                 ", ".join(f"{r.name}<-{_origin(r)}" for r in self.cfg.rooms), self.cfg.auth)

    # ---------------------------------------------------------------- reload

    def reload(self, new: NodeConfig) -> list[str]:
        """Apply a new config without dropping listeners of rooms that stay:
        rooms are added, removed (their listeners told UNKNOWN_ROOM) or
        changed in place; limits, rates and tokens take effect for the next
        join. Returns what changed, one line each."""
        plan = plan_reload(self.cfg, new, self.core.capacity, self.core.rooms)
        notes = plan.notes
        if plan.refused:
            return notes
        for name in plan.remove:
            self._tell(self.sessions.end_room(name), "room removed")
            up = self.upstreams.pop(name, None)
            if up is not None:
                up.stop()
            self.stages.close(name)
            self.udp.to_stage.pop(name, None)
            self.udp.unbind_ingest(name)
            state = self.rooms.pop(name)
            self.core.room_close(state.index)
            self._free_rooms.append(state.index)
            self._rates.pop(name, None)
            self._rate_seen.pop(name, None)
            notes.append(f"room {name!r} removed")
        for r in plan.add:
            self._open_room(r)
            if self._bind_ingest(r, notes):
                notes.append(f"room {r.name!r} added")
        for r in plan.sources:
            self._allow_sources(self.rooms[r.name], r)
            notes.append(f"room {r.name!r}: sources now {r.sources}")
        for r in plan.rules:
            self._publish_rules(self.rooms[r.name], r)
            notes.append(f"room {r.name!r}: publishers now {'SRTP' if r.srtp_key else 'plain RTP'}, takeover "
                         + ("after a BYE or release" if r.takeover_after is None else f"after {r.takeover_after:g} s"))
        for r in plan.upstream:
            self.upstreams[r.name].nodes = r.upstream
            notes.append(f"room {r.name!r}: upstream now {', '.join(f'{h}:{p}' for h, p in r.upstream)}")
        for r in plan.rebind:
            if self._bind_ingest(r, notes):
                notes.append(f"room {r.name!r}: ingest now {_origin(r)}")
        for r in plan.limits:
            self.rooms[r.name].max_listeners = r.max_listeners
            if r.stage:
                self.stages.set_limit(r.name, r.max_speakers)
        self.sessions.reconfigure(new, Auth(new.auth, new.secret))
        self.cfg = new
        if self.quic is not None:
            note = self.quic.reload_certificate(new.quic_cert, new.quic_key)
            if note:
                notes.append(note)
        return notes

    def _bind_ingest(self, r: RoomConfig, notes: list[str]) -> bool:
        if r.ingest is None:
            return True
        try:
            self.udp.bind_ingest(r.name, self.rooms[r.name].index, r.ingest)
        except OSError as e:
            kept = " (kept the old port)" if r.name in self.udp.ingest else ""
            notes.append(f"room {r.name!r}: cannot bind ingest {r.ingest[0]}:{r.ingest[1]}: {e.strerror}{kept}")
            return False
        return True

    def _on_sighup(self, reload_config: Callable[[], NodeConfig]) -> None:
        try:
            new = reload_config()
        except Exception as e:  # a bad file must not take the node down
            log.error("reload refused, keeping the running config: %s", e)
            return
        notes = self.reload(new)
        log.warning("config reloaded%s", "".join(f"; {n}" for n in notes) or ": no changes",
                    extra={"fields": {"event": "reload", "changes": notes}})

    # ---------------------------------------------------------- housekeeping

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(HOUSEKEEPING_S)
            self.load.loop_lag = max(0.0, loop.time() - t0 - HOUSEKEEPING_S)
            self.sessions.expire(time.monotonic())
            if self.quic is not None:
                self.quic.keepalive(time.monotonic())
            self.senders.check()
            self._measure_load()
            now = time.monotonic()
            stats = {name: self.core.room_stats(r.index) for name, r in self.rooms.items()}
            for name, up in self.upstreams.items():
                up.want(stats[name]["listeners"], now, self.cfg.upstream_linger)
            self.events.tick(now, stats)
            self._measure_rates(now, stats)
            relayed = {name: (up.index, said) for name, up in self.upstreams.items()
                       if (said := up.speakers) is not None}
            self.stages.tell_speakers(self.udp.out_fd, now, self.quic.tell_room if self.quic else None, relayed)

    def _measure_load(self) -> None:
        """Update the load measures and tell admission: joins stop before the
        node runs out of CPU, not after."""
        busy = self.core.busy_ns() if self.core.threaded else [self.udp.busy_ns]
        if self.load.measure(busy):
            self.sessions.note_load(self.load.duty, self.load.machine_busy, self.core.listeners)
            if self.quic is not None:
                self.quic.note_load(self.load.loop_duty, self.load.interval_ns)

    # ----------------------------------------------------------------- admin

    def _not_ready(self) -> str:
        if self.sessions.draining:
            return "draining"
        if self.core.listeners >= self.cfg.max_listeners:
            return "full"
        return ""

    def _room_list(self) -> list[dict[str, Any]]:
        now = time.monotonic_ns()
        rooms = []
        for r in self.rooms.values():
            st = self.core.room_stats(r.index)
            received = st["packets_in"] + st["seq_gaps"]
            rooms.append({
                "name": r.name, "listeners": st["listeners"],
                "by_transport": {t: self.sessions.listeners(r.name, t) for t in (UDP, *PULLED)},
                "packets_in": st["packets_in"],
                "bitrate_in_bps": round(self._rates.get(r.name, 0.0)),
                # publisher to node: sequence numbers that never arrived
                "loss_in": st["seq_gaps"] / received if received else 0.0,
                "drops_in": {k: st[f"drop_{k}"] for k in ("foreign", "malformed", "oversized", "late")},
                "publisher_silent_s": (now - st["last_rx_ns"]) / 1e9 if st["have_stream"] else None})
            if self.stages.has(r.name):
                rooms[-1]["stage"] = self.stages.describe(r.name)
        return rooms

    # ------------------------------------------------------------- directory

    def _describe(self) -> dict[str, Any]:
        """This node's directory record."""
        quic = webtransport = cert = ""
        if self.quic is not None and self.cfg.advertise:
            quic = f"{self.cfg.advertise.rpartition(':')[0]}:{self.quic.port}"
            info = self.quic.describe()
            webtransport = f"https://{quic}{info['path']}"
            cert = info["cert_sha256"] or ""
        carried = [name for name, r in self.rooms.items()
                   if name not in self.upstreams or self.upstreams[name].current is not None]
        return {"udp": self.cfg.advertise, "quic": quic, "webtransport": webtransport, "cert": cert,
                "tier": self.cfg.tier,
                "capacity": self.cfg.max_listeners, "listeners": self.core.listeners,
                "load": round(self.load.duty, 4), "draining": self.sessions.draining, "rooms": carried}

    def _cluster(self) -> Cluster:
        d = self.directory
        return Cluster(d is not None, d is not None and d.reachable, len(d.peers) if d else 0,
                       d.failures if d else 0,
                       {name: (up.current is not None, up.switches) for name, up in self.upstreams.items()})

    def _route(self, room: str, transport: str) -> str:
        """A live node with room for a listener this node turns away."""
        assert self.directory is not None
        peer = self.directory.pick(room, tier=self.cfg.tier, exclude=self.cfg.advertise)
        if peer is None:
            return ""
        return peer.udp if transport == UDP else peer.quic

    def _where_to_join(self, room: str) -> dict[str, Any] | None:
        """GET /join: where a new listener of `room` should connect; this
        node if it would take one, else the directory's pick."""
        if room not in self.rooms:
            return None
        if not self.sessions.draining and self.core.listeners < self.cfg.max_listeners and self.cfg.advertise:
            me = self._describe()
            return {"room": room, "node": self.cfg.node_id, "udp": me["udp"], "quic": me["quic"],
                    "webtransport": me["webtransport"], "cert_sha256": me["cert"]}
        if self.directory is not None:
            peer = self.directory.pick(room, tier=self.cfg.tier, exclude=self.cfg.advertise)
            if peer is not None:
                return {"room": room, "node": peer.id, "udp": peer.udp, "quic": peer.quic,
                        "webtransport": peer.webtransport, "cert_sha256": peer.cert}
        return {"room": room, "node": "", "udp": "", "quic": "", "webtransport": "", "cert_sha256": ""}

    def _sent(self) -> None:
        """A packet was fed to the core from Python: an inline core sends it now."""
        if not self.core.threaded:
            self.udp.flush_inline()

    def _release(self, name: str) -> bool:
        """The operator lets the next publisher stream take the room."""
        state = self.rooms.get(name)
        if state is None:
            return False
        self.core.room_release(state.index)
        emit("room_released", f"room {name!r}: released by the operator; the next publisher stream takes it",
             room=name)
        return True

    def _measure_rates(self, now: float, stats: dict[str, dict[str, Any]]) -> None:
        """Each room's incoming bitrate, over windows of about a second."""
        for name, st in stats.items():
            got = st["bytes_in"]
            then, seen = self._rate_seen.setdefault(name, (now, got))
            if now - then >= 1.0:
                self._rates[name] = 8 * (got - seen) / (now - then)
                self._rate_seen[name] = (now, got)

    def _index(self) -> list[tuple[str, str]]:
        """What the admin port's / links to."""
        links = [(f"/listen?room={name}", f"listen to {name} in this browser") for name in self.rooms]
        return links + [("/rooms", "rooms: listeners, bitrate, loss, drops"), ("/metrics", "Prometheus metrics"),
                        ("/healthz", "alive"), ("/readyz", "ready for new listeners"),
                        ("/quic.json", "QUIC and WebTransport address")]

    # -------------------------------------------------------------- shutdown

    def _tell(self, tells: list[Tell], close: str = "") -> int:
        """Tell ended sessions why, each on its own transport; returns how many."""
        told = self.udp.send(Sessions.sends(tells))
        for t in tells:
            if t.session.transport != UDP and self.quic is not None:
                self.quic.tell(t.session, t.reject, close)
                told += 1
        return told

    def drain(self) -> int:
        """Stop admitting and tell every listener to go (REJECT DRAINING,
        with the redirect if configured). Returns listeners told."""
        return self._tell(self.sessions.drain())

    def close(self) -> None:
        """Release every socket, thread and task."""
        for t in self._tasks:
            t.cancel()
        for up in self.upstreams.values():
            up.stop()
        if self.directory is not None:
            self.directory.stop()
        self.senders.stop()
        self.stages.stop()
        self.admin.close()
        if self.quic is not None:
            self.quic.close()
        self.udp.close()

    async def run_until_signalled(self, reload_config: Callable[[], NodeConfig] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, then drain and exit. SIGHUP calls
        `reload_config` and applies what it returns."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if reload_config is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup, reload_config)
        await stop.wait()
        stop.clear()
        await self.drain_gracefully(stop)
        # let the kernel take the last datagrams before the socket goes
        await asyncio.sleep(0.1)
        if self.directory is not None:
            await self.directory.close(leave=True)
        self.close()

    async def drain_gracefully(self, hurry: asyncio.Event) -> int:
        """Leave the way a load balancer expects: /readyz fails and new joins
        are refused (with the redirect) at once; the listeners we have keep
        listening for [node] drain_grace seconds, so the balancer can stop
        sending new ones; then they are moved at [node] drain_rate per
        second, in batches every 0.1 s, so the node they go to is not hit by
        all of them at once. `hurry` (a second signal) moves the rest at
        once. Returns the listeners told."""
        cfg = self.cfg
        self.sessions.draining = True
        emit("draining", f"draining: not ready; serving {len(self.sessions.table)} listeners "
             f"{cfg.drain_grace:g} s more, then moving them at {cfg.drain_rate:g}/s",
             listeners=len(self.sessions.table), grace_s=cfg.drain_grace)
        try:
            await asyncio.wait_for(hurry.wait(), cfg.drain_grace)
        except asyncio.TimeoutError:
            pass
        batch = max(1, int(cfg.drain_rate * DRAIN_STEP_S))
        told = 0
        while self.sessions.table:
            told += self._tell(self.sessions.drain(None if hurry.is_set() else batch))
            if self.sessions.table:
                await asyncio.sleep(DRAIN_STEP_S)
        emit("drained", f"drained: told {told} listeners to move", told=told)
        return told
