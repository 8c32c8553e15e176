"""The AF_XDP egress on a real data path: a namespace and a veth pair this
test makes, listeners inside it on IPv4 and IPv6, the core sending from our
end through AF_XDP. Every listener must get every packet the model says it
gets, byte for byte, with UDP checksums a packet socket verifies; and an
interface AF_XDP cannot use must leave the node on sendmmsg with one log
line. Root only; bounded in packets (a few hundred) and time."""
from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from relay._core import Core
from relay.listeners.xdp import XdpListeners
from relay.testing.loadgen import free_port, scrape
from relay.testing.model import ModelCore
from relay.testing.veth import can_make, veth_pair
from relay.wire.addr import to_sockaddr
from relay.wire.egress_config import XdpConfig
from tests.conftest import stop
from tests.rtp import SRC_A, rtp

LISTENERS = 6
PACKETS = 40
PORT = 6000

why_not = can_make()
pytestmark = pytest.mark.skipif(bool(why_not), reason=why_not)


@pytest.fixture(scope="module")
def veth():
    try:
        pair = veth_pair("t", queues=2)
        v = pair.__enter__()
    except subprocess.CalledProcessError as e:     # a container without CAP_SYS_ADMIN, say
        pytest.skip(f"cannot make a namespace and a veth here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    try:
        yield v
    finally:
        pair.__exit__(None, None, None)


def _receivers(veth, ip: str, expect: int) -> subprocess.Popen:
    rx = veth.python("relay.testing.xdp_rx", "--ip", ip, "--port", str(PORT), "--count", str(LISTENERS),
                     "--iface", veth.peer, "--expect", str(expect), "--idle", "2", "--timeout", "10",
                     stdout=subprocess.PIPE, text=True)
    assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
    return rx


def _egress(core: Core, veth, caplog, out: socket.socket, frames: int = 4096) -> XdpListeners:
    xl = XdpListeners(core, XdpConfig(veth.local, frames=frames))
    with caplog.at_level(logging.WARNING, logger="relay.egress"):
        if not xl.start(out):
            pytest.skip(f"the kernel refuses AF_XDP here: {caplog.records[-1].getMessage()}")
    return xl


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_every_listener_gets_every_packet_byte_exact(veth, caplog, v6, shards):
    family = socket.AF_INET6 if v6 else socket.AF_INET
    local, peer = (veth.local6, veth.peer6) if v6 else (veth.local4, veth.peer4)
    out = socket.socket(family, socket.SOCK_DGRAM)
    out.bind((local, 0))
    out.sendto(b"resolve", (peer, 9))        # the kernel learns the peer's MAC, as a handshake would
    core = Core(64, rooms=1, depth=64, ring_bytes=16384, shards=shards, threaded=shards > 1)
    model = ModelCore(64, rooms=1, depth=64, ring_bytes=16384)
    xl = _egress(core, veth, caplog, out)
    threads = []
    try:
        for c in (core, model):
            c.room_open(0, any_source=True)
        rx = _receivers(veth, peer, LISTENERS * PACKETS)
        slots = {}
        for n in range(LISTENERS):
            sa = to_sockaddr((peer, PORT + n))
            args = (0, sa, 0x1000 + n, 7 * n, 1000 * n)
            slot = core.listener_add(*args)
            assert xl.place(slot, sa), "a listener on the veth's subnet goes through AF_XDP"
            slots[model.listener_add(*args)] = PORT + n
        if core.threaded:
            threads = [threading.Thread(target=core.run_shard, args=(k, out.fileno())) for k in range(shards)]
            for t in threads:
                t.start()
        for i in range(PACKETS):
            pkt = rtp(100 + i, 960 * i, 0xABCD, bytes([i]) * (60 + 7 * i))   # odd and even lengths
            now = 1_000_000 * i
            assert core.feed(0, pkt, SRC_A, now) == model.feed(0, pkt, SRC_A, now)
            if not core.threaded:
                assert core.flush(out.fileno()) == 0
        expected: dict[int, list[str]] = {p: [] for p in slots.values()}
        for slot, p in model.mark_sent():
            expected[slots[slot]].append(p.hex())
        got = json.loads(rx.communicate(timeout=20)[0])
        by_xdp = xl.xdp.counters()["packets"]
    finally:
        core.stop_shards()
        for t in threads:
            t.join(5)
        xl.close()
        out.close()
    assert {int(p): v for p, v in got["ports"].items()} == expected
    assert got["bad"] == 0 and got["checked"] >= LISTENERS * PACKETS
    assert core.counters()["packets_out"] == LISTENERS * PACKETS
    assert by_xdp == LISTENERS * PACKETS      # all of it through AF_XDP, none by sendmmsg


def test_frames_come_back_through_the_completion_ring(veth, caplog):
    """64 UMEM frames and 240 packets in one flush: frames are taken back
    from the completion ring and used again, and every packet still
    arrives, in order, byte for byte."""
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.bind((veth.local4, 0))
    out.sendto(b"resolve", (veth.peer4, 9))
    core = Core(8, rooms=1, depth=64, ring_bytes=16384, threaded=False)
    model = ModelCore(8, rooms=1, depth=64, ring_bytes=16384)
    xl = _egress(core, veth, caplog, out, frames=64)
    try:
        for c in (core, model):
            c.room_open(0, any_source=True)
        rx = _receivers(veth, veth.peer4, LISTENERS * PACKETS)
        ports = {}
        for n in range(LISTENERS):
            sa = to_sockaddr((veth.peer4, PORT + n))
            assert xl.place(core.listener_add(0, sa, n, n, n), sa)
            ports[model.listener_add(0, sa, n, n, n)] = PORT + n
        for i in range(PACKETS):
            pkt = rtp(i, 960 * i, 0xABCD, bytes([i]) * (80 + i))
            core.feed(0, pkt, SRC_A, 1_000_000 * i)
            model.feed(0, pkt, SRC_A, 1_000_000 * i)
        assert core.flush(out.fileno()) == 0           # all of it at once
        expected: dict[int, list[str]] = {p: [] for p in ports.values()}
        for slot, p in model.mark_sent():
            expected[ports[slot]].append(p.hex())
        got = json.loads(rx.communicate(timeout=20)[0])
        counters = xl.xdp.counters()
    finally:
        xl.close()
        out.close()
    assert {int(p): v for p, v in got["ports"].items()} == expected
    assert counters["packets"] == LISTENERS * PACKETS and counters["kick_errors"] == 0


def test_a_new_next_hop_mac_is_used_at_once(veth, caplog):
    """The peer's MAC changes and the neighbour table says so: the next
    frames carry the new MAC (the peer drops frames not addressed to it)."""
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.bind((veth.local4, 0))
    out.sendto(b"resolve", (veth.peer4, 9))
    core = Core(8, rooms=1, depth=16, threaded=False)
    xl = _egress(core, veth, caplog, out)
    new_mac = "02:00:00:00:20:01"
    try:
        core.room_open(0, any_source=True)
        sa = to_sockaddr((veth.peer4, PORT))
        slot = core.listener_add(0, sa, 1, 0, 0)
        assert xl.place(slot, sa)
        subprocess.run(["ip", "-n", veth.netns, "link", "set", veth.peer, "address", new_mac], check=True)
        subprocess.run(["ip", "neigh", "replace", veth.peer4, "lladdr", new_mac, "dev", veth.local,
                        "nud", "reachable"], check=True)
        for _ in range(50):              # the change arrives on the watching netlink socket
            xl.on_changes()
            if xl._macs.get(veth.peer4) == bytes.fromhex(new_mac.replace(":", "")):
                break
            time.sleep(0.02)
        rx = _receivers(veth, veth.peer4, 10)
        for i in range(10):
            core.feed(0, rtp(i, 960 * i, 5, b"x" * 100), SRC_A, 1_000_000 * i)
            core.flush(out.fileno())
        got = json.loads(rx.communicate(timeout=20)[0])
    finally:
        xl.close()
        out.close()
    assert len(got["ports"][str(PORT)]) == 10


def test_an_interface_xdp_cannot_use_falls_back_with_one_line(veth, caplog):
    """Queue 4000 does not exist on the veth: every shard keeps sendmmsg,
    one warning says why, and listeners still get their audio."""
    core = Core(8, rooms=1, depth=16, shards=2, threaded=True)
    recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    recv.bind(("127.0.0.1", 0))
    recv.settimeout(5)
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.bind(("127.0.0.1", 0))
    xl = XdpListeners(core, XdpConfig(veth.local, queue=4000))
    with caplog.at_level(logging.INFO, logger="relay.egress"):
        assert not xl.start(out)
    lines = [r for r in caplog.records if r.name == "relay.egress"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    assert veth.local in lines[0].getMessage() and "sendmmsg" in lines[0].getMessage()
    assert xl.xdp.shards() == [False, False]
    core2 = Core(8, rooms=1, depth=16, threaded=False)
    xl2 = XdpListeners(core2, XdpConfig("nosuch0"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="relay.egress"):
        assert not xl2.start(out)
    assert len([r for r in caplog.records if r.name == "relay.egress"]) == 1
    core2.room_open(0, any_source=True)
    sa = to_sockaddr(recv.getsockname())
    slot = core2.listener_add(0, sa, 9, 0, 0)
    assert not xl2.place(slot, sa)
    core2.feed(0, rtp(1, 960, 5, b"hello"), SRC_A, 0)
    assert core2.flush(out.fileno()) == 0
    data = recv.recv(100)
    assert data[12:] == b"hello" and struct.unpack_from("!I", data, 8)[0] == 9
    recv.close()
    out.close()


def test_a_node_with_egress_xdp_sends_its_listeners_audio_through_af_xdp(veth, tmp_path):
    """`relay serve` with egress = "xdp": a `relay listen` in the namespace
    joins through the protocol and hears every packet, and the node's
    metrics say all of them left through AF_XDP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((veth.local4, 0))
        listen = s.getsockname()[1]
    admin, ingest = free_port(socket.SOCK_STREAM), free_port()
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f"""
[node]
listen = "{veth.local4}:{listen}"
admin = "127.0.0.1:{admin}"
auth = "open"
max_load = 0
max_machine_load = 0
drain_grace = 0
workers = 2
egress = "xdp"
xdp_interface = "{veth.local}"
[[room]]
name = "live"
ingest = "127.0.0.1:{ingest}"
sources = ["127.0.0.1"]
""")
    node = subprocess.Popen([sys.executable, "-m", "relay", "--log-level", "info", "serve", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pub = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener = None
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                scrape(("127.0.0.1", admin), timeout=1)
                break
            except OSError:
                assert node.poll() is None and time.monotonic() < deadline, "the node did not start"
                time.sleep(0.1)
        listener = veth.python("relay", "listen", "--server", f"{veth.local4}:{listen}", "--room", "live",
                               "--duration", "6", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # joined before the first packet: the node says so (a sanitizer build
        # or a busy machine takes longer than a second)
        joined_by = time.monotonic() + 10
        while scrape(("127.0.0.1", admin)).get('relay_listeners{room="live",transport="udp"}', 0) < 1:
            assert time.monotonic() < joined_by and listener.poll() is None, "the listener never joined"
            time.sleep(0.1)
        for k in range(60):
            pub.sendto(rtp(k, 960 * k, 0xA, bytes(100)), ("127.0.0.1", ingest))
            time.sleep(0.02)
        text = listener.communicate(timeout=20)[0]
        m = scrape(("127.0.0.1", admin))
    finally:
        pub.close()
        if listener is not None and listener.poll() is None:
            listener.kill()
        assert stop(node) == 0
    log = node.stdout.read() if node.stdout else ""
    if "AF_XDP refused" in log:
        pytest.skip(f"the kernel refuses AF_XDP here: {log}")
    assert listener.returncode == 0 and "received 60" in text and "lost 0" in text, text
    assert m["relay_xdp_sockets"] == 2 and m["relay_xdp_listeners"] == 1   # a socket per sender shard
    assert m["relay_xdp_frames_total"] == m["relay_packets_out_total"] == 60
