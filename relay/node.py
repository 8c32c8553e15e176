"""`relay serve`: one node, wired together.

The data path runs through the parts in the order packets travel: the
ingest ports (relay/ingest) feed the compiled core (relay/_core.pyx), or a
room's stage (relay/stage) feeds it its mix; the core fans out into
listener rings and sends with sendmmsg on the listener port
(relay/listeners), on the loop thread (inline, one worker) or on sender
threads (one per shard), and seals QUIC listeners' audio the same way. A
room may come from upstream nodes instead (relay/cluster). Around it: the
operator's admin port, metrics, event log and reload plans (relay/ops).
This module owns their lifecycle and passes each part only what it needs;
what to decide lives in the part that owns it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from functools import partial
from typing import Any, Callable

from prometheus_client import generate_latest

from relay import __version__
from relay._core import Core
from relay.cluster import routing
from relay.cluster.directory import Directory
from relay.cluster.pair import Aligner
from relay.cluster.neighbours import Neighbours
from relay.cluster.upstream import GAP_BOUNDS, Upstream, relay_token
from relay.hls.rooms import HlsRooms
from relay.ops.hosting import Hosting
from relay.ops.tasks import supervised
from relay.ingest import rules
from relay.ingest.ports import IngestPorts
from relay.listeners.drain import drain_gracefully
from relay.listeners.load import LoadMeter
from relay.listeners.quic.endpoint import QuicEndpoint
from relay.listeners.senders import SenderThreads
from relay.listeners.sessions import UDP, RoomState, Sessions, Tell, relay_ssrc
from relay.listeners.session import udp_sends
from relay.listeners.udp import ListenerPort
from relay.listeners.xdp import XdpListeners
from relay.ops.admin import AdminServer, AdminViews
from relay.ops.events import EventLog, emit
from relay.ops.metrics import Cluster, NodeCollector, registry_for
from relay.ops.reload import plan_reload
from relay.ops.rooms import RoomRates, index_links, room_list
from relay.stage.stages import Stages
from relay.wire.config import NodeConfig, RoomConfig
from relay.wire.sockets import BindError, binding
from relay.wire.tokens import Auth, TokenError

log = logging.getLogger("relay.server")

HOUSEKEEPING_S = 0.25

__all__ = ["Node", "BindError"]


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
        self.udp = ListenerPort(self.core, self.sessions)
        self.xdp = XdpListeners(self.core, cfg.xdp) if cfg.xdp else None     # egress = "xdp"
        self.ingest = IngestPorts(self.core, lambda: self.udp.out_fd, self.udp.wait_writable)
        self.stages = Stages(self.core, list(range(cfg.max_rooms + cfg.speaker_slots - 1, cfg.max_rooms - 1, -1)),
                             self._sent, os.urandom, emit)
        self.sessions.stages = self.stages
        self.quic: QuicEndpoint | None = QuicEndpoint(self.core, self.sessions) if cfg.quic else None
        # LL-HLS reads each room through one pull listener of its own (relay/hls/room.py)
        self.hls = HlsRooms(self.core, cfg.hls_max_held, cfg.hls_max_connections, cfg.record_dir,
                            cfg.record_retention) if cfg.hls else None
        self.events = EventLog(self.core, self.sessions, cfg.log_interval, self._room_config)
        self.started = time.monotonic()
        self.collector = NodeCollector(self.core, self.sessions, self.load, self.senders,
                                       lambda: self.quic.counters if self.quic else None, self.started,
                                       self.ingest.srtp_drops, self._cluster, self.stages,
                                       hls=self.hls.stats if self.hls else None, gate=self.udp.gate_counters,
                                       xdp=self.xdp.counters if self.xdp else None)
        self.hosting = Hosting(self.sessions, self.core, self.udp, self.quic, self._tell)
        views = AdminViews(
            metrics=lambda: generate_latest(registry_for(self.collector)),
            not_ready=self._not_ready,
            rooms=lambda: room_list(self.core, self.rooms, self.sessions, self.stages, self.rates),
            index=lambda: index_links(list(self.rooms)), release=self._release,
            join=self._where_to_join, admits=self._admits,
            quic=self.quic.describe if self.quic else None,
            hls=self.hls.describe if self.hls else None, host=self.hosting.handle)
        # with [node] public, listeners' paths on that port and the operator's on admin
        self.admin = AdminServer(views, "operator" if cfg.public else "all")
        self.public = AdminServer(views, "public") if cfg.public else None
        self._free_rooms = list(range(cfg.max_rooms - 1, -1, -1))
        self._tasks: list[asyncio.Task] = []
        self.upstreams: dict[str, Upstream] = {}                 # rooms taken from other nodes
        self.directory: Directory | None = None
        if cfg.directory:
            self.directory = Directory(cfg.directory, cfg.node_id, self._describe)
        self.neighbours = Neighbours(self.directory, cfg, self.upstreams)
        if self.directory is not None:
            self.sessions.route = self.neighbours.route
        self.sessions.alternate = self.neighbours.alternate
        self.sessions.resumed = self.neighbours.resumed
        self.rates = RoomRates()
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
                self.ingest.to_stage[r.name] = partial(self.stages.on_ingest, r.name)
                self._publish_rules(state, r)
            self._open_hls(r, index)
            return state
        # a room from upstream is fed only by this node's own subscription;
        # an origin pair's publishers are checked before the core (ports.py)
        self.core.room_open(index, r.any_source or r.from_upstream or r.pair is not None)
        token = partial(relay_token, self.cfg.secret, r.name, self.cfg.node_id)
        if r.from_upstream:
            self.upstreams[r.name] = Upstream(r.name, index, r.upstream, self.core, token, self._sent,
                                              pair=self.cfg.upstream_pair, from_directory=r.from_directory)
        elif r.pair is not None:
            aligner = Aligner(relay_ssrc(r.name), r.pair_lead)
            self.ingest.rewrite[r.name] = lambda pkt: aligner.translate(pkt, time.monotonic())
            # each origin of a pair hears the other always: either may be left alone
            self.upstreams[r.name] = Upstream(r.name, index, [r.pair], self.core, token, self._sent, pair=False,
                                              tap=lambda pkt: aligner.partner_packet(pkt, time.monotonic()),
                                              always=True)
        self.rooms[r.name] = state
        self._allow_sources(state, r)
        self._open_hls(r, index)
        return state

    def _open_hls(self, r: RoomConfig, index: int) -> None:
        if self.hls is not None and r.hls:
            self.hls.open(r.name, index, r.record)

    def _allow_sources(self, state: RoomState, r: RoomConfig) -> None:
        rules.allow_sources(self.core, state.index, r)
        self._publish_rules(state, r)

    def _publish_rules(self, state: RoomState, r: RoomConfig) -> None:
        rules.apply_rules(self.core, state.index, r)
        self.ingest.use_srtp(r.name, r.srtp_key, rules.source_filter(r))

    async def start(self) -> None:
        """Bind every socket and start serving. Raises OSError if a port is taken."""
        loop = asyncio.get_running_loop()
        try:
            with binding("[node] listen", self.cfg.listen, "--listen"):
                self.udp.bind(self.cfg.listen)
            for r in self.cfg.rooms:
                if r.ingest is not None:
                    with binding(f"room {r.name!r}: ingest", r.ingest, "--room"):
                        self.ingest.bind(r.name, self.rooms[r.name].index, r.ingest)
            if self.cfg.admin:
                with binding("[node] admin", self.cfg.admin, "--admin"):
                    await self.admin.start(*self.cfg.admin)
            if self.public is not None and self.cfg.public is not None:
                with binding("[node] public", self.cfg.public, "--public"):
                    await self.public.start(*self.cfg.public)
            if self.quic is not None:
                with binding("[node] quic", self.quic.addr, "--quic"):
                    await self.quic.start()
            if self.hls is not None and self.cfg.hls is not None:
                with binding("[node] hls", self.cfg.hls, "--hls"):
                    await self.hls.start(*self.cfg.hls)
        except OSError:
            self.close()
            raise
        if self.xdp is not None and self.udp.listen_sock is not None and self.xdp.start(self.udp.listen_sock):
            self.sessions.placed = self.xdp.place
            self.xdp.watch(loop)
        self.udp.start(loop)
        self.ingest.start(loop)
        self.stages.start(loop)
        self.senders.start(self.udp.out_fd)
        self._tasks = [asyncio.create_task(supervised("housekeeping", self._housekeeping))]
        if self.directory is not None:
            self.directory.start()
        log.info("relay %s listening on %s, rooms: %s, auth: %s", __version__, self.listen_addr[:2],
                 ", ".join(f"{r.name}<-{r.origin}" for r in self.cfg.rooms), self.cfg.auth)

    def _room_config(self, name: str) -> RoomConfig | None:
        return next((r for r in self.cfg.rooms if r.name == name), None)

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
            self.ingest.to_stage.pop(name, None)
            self.ingest.rewrite.pop(name, None)
            self.ingest.unbind(name)
            if self.hls is not None:
                self.hls.close(name)
            state = self.rooms.pop(name)
            self.core.room_close(state.index)
            self._free_rooms.append(state.index)
            self.rates.forget(name)
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
            notes.append(f"room {r.name!r}: {rules.describe_rules(r)}")
        for r in plan.upstream:
            up = self.upstreams[r.name]
            up.nodes, up.from_directory = list(r.upstream), r.from_directory
            notes.append(f"room {r.name!r}: upstream now {r.origin.removeprefix('upstream ')}")
        for r in plan.rebind:
            if self._bind_ingest(r, notes):
                notes.append(f"room {r.name!r}: ingest now {r.origin}")
        for r in plan.limits:
            self.rooms[r.name].max_listeners = r.max_listeners
            if r.stage:
                self.stages.set_limit(r.name, r.max_speakers)
        self._reload_hls(new, notes)
        self.sessions.reconfigure(new, Auth(new.auth, new.secret))
        self.udp.configure(new.join_rate, new.join_rate_per_source)
        self.cfg = self.neighbours.cfg = new
        if self.quic is not None:
            note = self.quic.reload_certificate(new.quic_cert, new.quic_key)
            if note:
                notes.append(note)
        return notes

    def _reload_hls(self, new: NodeConfig, notes: list[str]) -> None:
        """A room's `hls` or `record` changed: start or stop its HLS. The
        port itself ([node] hls) takes a restart to move."""
        if self.hls is None:
            return
        for r in new.rooms:
            state = self.rooms.get(r.name)
            room = self.hls.get(r.name)
            if state is None or (room is not None) == r.hls and (room is None or
                                                                  (room.recorder is not None) == r.record):
                continue
            self.hls.close(r.name)
            if r.hls:
                self.hls.open(r.name, state.index, r.record)
            notes.append(f"room {r.name!r}: LL-HLS {'on' if r.hls else 'off'}"
                         + (", recorded" if r.hls and r.record else ""))

    def _bind_ingest(self, r: RoomConfig, notes: list[str]) -> bool:
        if r.ingest is None:
            return True
        try:
            self.ingest.bind(r.name, self.rooms[r.name].index, r.ingest)
        except OSError as e:
            kept = " (kept the old port)" if r.name in self.ingest.sockets else ""
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
                # an HLS tap alone does not keep an edge subscribed: HLS is
                # for the node's own listeners' rooms, not a reason to carry one
                tap = 1 if self.hls is not None and self.hls.get(name) is not None else 0
                up.want(stats[name]["listeners"] - tap, now, self.cfg.upstream_linger)
                if up.ended and not self.sessions.moderation.room(name).ended:
                    self.hosting.act(name, "end", "", "")     # ended at the origin: here too
            self.events.tick(now, stats)
            self.hosting.tick(now)
            self.rates.measure(now, stats)
            self.neighbours.refresh(now, self.rooms)
            relayed = {name: (up.index, said) for name, up in self.upstreams.items()
                       if (said := up.speakers) is not None}
            self.stages.tell_speakers(self.udp.out_fd, now, self.quic.tell_room if self.quic else None, relayed)

    def _measure_load(self) -> None:
        """Update the load measures and tell admission: joins stop before the
        node runs out of CPU, not after."""
        busy = self.core.busy_ns() if self.core.threaded else [self.udp.busy_ns + self.ingest.busy_ns]
        _, counts, seconds = self.core.latency_histogram()
        if self.load.measure(busy, (sum(counts), seconds), self.core.counters()["drop_shard_lag"]):
            self.sessions.note_load(self.load.duty, self.load.machine_busy, self.core.listeners,
                                    self.load.relay_share, self.load.behind)
            if self.quic is not None:
                self.quic.note_load(self.load.loop_duty, self.load.interval_ns)

    # ----------------------------------------------------------------- admin

    def _not_ready(self) -> str:
        if self.sessions.draining:
            return "draining"
        if self.core.listeners >= self.cfg.max_listeners:
            return "full"
        return ""

    # ------------------------------------------------------------- directory

    def _describe(self) -> dict[str, Any]:
        """This node's directory record."""
        carried = [name for name, r in self.rooms.items()
                   if name not in self.upstreams or self.upstreams[name].current is not None]
        return routing.node_record(self.cfg, self.quic.port if self.quic else None,
                                   self.quic.describe() if self.quic else None, carried,
                                   self.core.listeners, self.load.duty, self.sessions.draining,
                                   self.neighbours.parents())

    def _cluster(self) -> Cluster:
        d = self.directory
        ups = self.upstreams.values()
        gaps = None
        if ups:
            gaps = (list(GAP_BOUNDS), [sum(counts) for counts in zip(*(u.gap_counts for u in ups), strict=True)],
                    sum(u.gap_sum for u in ups))
        return Cluster(d is not None, d is not None and d.reachable, len(d.peers) if d else 0,
                       d.failures if d else 0,
                       {name: up.state() for name, up in self.upstreams.items()}, gaps,
                       dict(d.rejected) if d else {})

    def _admits(self, room: str, token: str) -> str:
        """GET /join's check: "" if `token` admits a listener of `room`."""
        if self.cfg.auth == "open":
            return ""
        if not token:
            return "this node answers /join only with a listen token for the room (add token=...)"
        try:
            self.sessions.auth.claims(token, room, ("listen", "relay"))
        except TokenError as e:
            return f"the token does not admit a listener of room {room!r}: {e.reason.name.lower()}"
        return ""

    def _where_to_join(self, room: str) -> dict[str, Any] | None:
        """GET /join: where a new listener of `room` should connect."""
        if room not in self.rooms:
            return None
        takes = not self.sessions.draining and self.core.listeners < self.cfg.max_listeners
        return routing.where_to_join(room, self.cfg, self._describe() if takes else None, self.directory,
                                     self.neighbours.alternates.get(room, ()))

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

    # -------------------------------------------------------------- shutdown

    def _tell(self, tells: list[Tell], close: str = "") -> int:
        """Tell ended sessions why, each on its own transport; returns how many."""
        told = self.udp.send(udp_sends(tells))
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
        if self.public is not None:
            self.public.close()
        if self.hls is not None:
            self.hls.close_all()
        if self.quic is not None:
            self.quic.close()
        self.ingest.close()
        if self.xdp is not None:
            self.xdp.close()
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
        self.events.flush({name: self.core.room_stats(r.index) for name, r in self.rooms.items()})
        # let the kernel take the last datagrams before the socket goes
        await asyncio.sleep(0.1)
        if self.directory is not None:
            await self.directory.close(leave=True)
        self.close()

    async def drain_gracefully(self, hurry: asyncio.Event) -> int:
        """Stop admitting and move the listeners away at the configured
        pace (listeners/drain.py); `hurry` moves the rest at once."""
        return await drain_gracefully(self.sessions, self._tell, self.cfg, hurry, emit)
