"""LL-HLS from a node (docs/hls.md), measured.

    .venv/bin/python bench/hls.py            # about a minute and a half
    .venv/bin/python bench/hls.py --smoke    # about half a minute

Reports, into bench/results/hls.json and a Markdown table on stdout:
  latency    glass to glass on loopback: the publisher's RTP packet that
             starts a beep (each beep a frequency of its own, once a second)
             to the beep decoded by a reader of the room's LL-HLS URL,
             p50 with p10-p90 spread, for
               ffmpeg   ffmpeg's HLS demuxer (whole segments; it does not
                        read parts), decoding to PCM on a pipe;
               hls.js   the listener page in headless Chromium forced onto
                        LL-HLS (/listen?transport=hls): hls.js's own latency
                        estimate, the playhead's PROGRAM-DATE-TIME (the
                        node's clock when the audio came in) against now,
                        sampled twice a second once it plays;
               parts    a client that follows parts with blocking reloads
                        from the live edge, as LL-HLS players do, decoding
                        each part with PyAV as it comes (a player's buffer
                        on top of that is its own choice: hls.js holds
                        about PART-HOLD-BACK, 0.6 s).
  mux_cpu    the node's event-loop CPU seconds per second of audio spent
             draining a room's tap, muxing both renditions and encoding
             AAC (relay_hls_mux_cpu_seconds_total), and so rooms per core.
  requests   HLS requests the node answers per second of its own CPU
             (all threads), clients following parts straight at the node.
  proxy      requests reaching the node per part, behind nginx with the
             shipped origin config, as clients grow 10 -> 100 -> 1000.
Every loop here is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))

import av  # noqa: E402
import numpy as np  # noqa: E402
import opuslib  # noqa: E402

from relay.client.publish import RtpPacketizer  # noqa: E402
from relay.testing.hls_crowd import crowd, next_position  # noqa: E402
from relay.testing.loadgen import free_port, raise_fd_limit, scrape, wait_ready  # noqa: E402
from relay.testing.nginx import start_nginx  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RATE, FRAME = 48_000, 960
CODES = [600.0 + 200.0 * k for k in range(8)]     # beep k of a cycle has its own pitch
BEEP_S = 0.1


class Node:
    """`relay serve` with one room and its HLS port, in a process of its own."""

    def __init__(self, workdir: Path) -> None:
        self.ingest = ("127.0.0.1", free_port())
        self.admin = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        self.hls = ("127.0.0.1", free_port(socket.SOCK_STREAM))
        cfg = workdir / "relay.toml"
        cfg.write_text(f"""[node]
listen = "127.0.0.1:{free_port()}"
admin = "{self.admin[0]}:{self.admin[1]}"
hls = "{self.hls[0]}:{self.hls[1]}"
auth = "open"
workers = 1
max_load = 0
max_machine_load = 0
drain_grace = 0
[[room]]
name = "live"
ingest = "{self.ingest[0]}:{self.ingest[1]}"
sources = ["127.0.0.1"]
""")
        self.proc = subprocess.Popen([sys.executable, "-m", "relay", "--log-level", "warning", "serve", "-c", str(cfg)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_ready(self.admin, self.proc, 15):
            raise RuntimeError("the relay did not start")

    def url(self, path: str) -> str:
        return f"http://{self.hls[0]}:{self.hls[1]}{path}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)


class BeepPublisher(threading.Thread):
    """RTP/Opus in real time: silence with a BEEP_S beep once a second, beep
    k at CODES[k % 8]; `sent` holds (code, wall time its first packet left)."""

    def __init__(self, to: tuple[str, int], seconds: float) -> None:
        super().__init__(daemon=True)
        self.to, self.seconds = to, seconds
        self.sent: list[tuple[int, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        enc = opuslib.Encoder(RATE, 1, opuslib.APPLICATION_AUDIO)
        rtp = RtpPacketizer()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t = np.arange(FRAME) / RATE
        start = time.monotonic()
        for n in range(int(self.seconds * RATE / FRAME)):
            if self.stop.is_set():
                break
            second, within = divmod(n, RATE // FRAME)
            code = second % len(CODES)
            beep = within < BEEP_S * RATE / FRAME
            pcm = (0.5 * 32767 * np.sin(2 * np.pi * CODES[code] * (t + within * FRAME / RATE))) if beep \
                else np.zeros(FRAME)
            packet = rtp.packet(enc.encode(pcm.astype("<i2").tobytes(), FRAME))
            delay = start + n * FRAME / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sock.sendto(packet, self.to)
            if beep and within == 0:
                self.sent.append((code, time.time()))
        sock.close()


class OnsetDetector:
    """Beeps in a PCM stream as it is decoded: (code, wall time decoded)."""

    def __init__(self) -> None:
        self.buf = np.zeros(0)
        self.quiet = True
        self.found: list[tuple[int, float]] = []

    def feed(self, pcm: np.ndarray, at: float) -> None:
        self.buf = np.concatenate([self.buf, pcm])
        win = RATE // 100
        while len(self.buf) >= int(RATE * BEEP_S):
            level = np.sqrt(np.mean(self.buf[:win] ** 2))
            if self.quiet and level > 2000:
                seg = self.buf[:int(RATE * BEEP_S * 0.8)]
                freqs = np.fft.rfftfreq(len(seg), 1 / RATE)
                peak = freqs[np.argmax(np.abs(np.fft.rfft(seg * np.hanning(len(seg)))))]
                self.found.append((int(np.argmin([abs(peak - c) for c in CODES])), at))
                self.quiet = False
            elif level < 300:
                self.quiet = True
            self.buf = self.buf[win:]


def latencies(sent: list[tuple[int, float]], found: list[tuple[int, float]], since: float) -> list[float]:
    """For each beep heard, the time since the latest send of its code
    before it; only beeps sent after `since` (a reader's start: what it
    reads of the playlist's past at start-up is not latency)."""
    out = []
    for code, at in found:
        before = [t for c, t in sent if c == code and since <= t <= at]
        if before and at - before[-1] < len(CODES) - 1:
            out.append(at - before[-1])
    return out


def ffmpeg_reader(node: Node, seconds: float, det: OnsetDetector) -> None:
    proc = subprocess.Popen(["ffmpeg", "-v", "error", "-i", node.url("/rooms/live/opus/index.m3u8"),
                             "-t", str(seconds), "-f", "s16le", "-ac", "1", "-ar", str(RATE), "-"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while chunk := proc.stdout.read(1920):
        det.feed(np.frombuffer(chunk, dtype="<i2").astype(float), time.time())
    proc.wait()


async def part_reader(node: Node, seconds: float, det: OnsetDetector) -> None:
    """Follow parts from the live edge with blocking reloads; decode each as it arrives."""
    reader, writer = await asyncio.open_connection(*node.hls)

    async def get(path: str) -> bytes:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        n = int(re.search(r"(?i)content-length: (\d+)", head)[1])
        return await reader.readexactly(n)
    base = "/rooms/live/opus"
    init = await get(f"{base}/init.mp4")
    text = (await get(f"{base}/index.m3u8")).decode()
    msn, part = (int(x) for x in re.search(r'PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"', text).groups())
    deadline = time.monotonic() + seconds
    dec = av.CodecContext.create("libopus", "r")
    while time.monotonic() < deadline:
        text = (await get(f"{base}/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")).decode()
        data = await get(f"{base}/s{msn}.{part}.m4s")
        with av.open(io.BytesIO(init + data), format="mp4") as f:
            # packed samples come interleaved in one row: one column per channel, averaged
            pcm = [fr.to_ndarray().reshape(-1, len(fr.layout.channels)).mean(axis=1)
                   for p in f.demux(audio=0) if p.size for fr in dec.decode(p)]
        if pcm:
            det.feed(np.concatenate(pcm) * (32767 if pcm[0].dtype.kind == "f" else 1), time.time())
        nxt = next_position(text, msn, part)
        if nxt is None:
            break
        msn, part = nxt
    writer.close()


def summary(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 3), "p10_s": round(q[0], 3),
            "p90_s": round(q[-1], 3)}


def measure_latency_and_mux(node: Node, pub: BeepPublisher, seconds: float) -> dict:
    time.sleep(4)           # a few segments, so both readers start at a live edge with history
    m0, t0, since = scrape(node.admin), time.monotonic(), time.time()
    ff, parts = OnsetDetector(), OnsetDetector()
    th = threading.Thread(target=ffmpeg_reader, args=(node, seconds, ff), daemon=True)
    th.start()
    asyncio.run(part_reader(node, seconds, parts))
    th.join(seconds + 15)
    m1, t1 = scrape(node.admin), time.monotonic()
    if os.environ.get("RELAY_BENCH_DEBUG"):
        print("sent", [(c, round(t % 100, 2)) for c, t in pub.sent])
        print("ffmpeg", [(c, round(t % 100, 2)) for c, t in ff.found])
        print("parts", [(c, round(t % 100, 2)) for c, t in parts.found])
    mux = (m1["relay_hls_mux_cpu_seconds_total"] - m0["relay_hls_mux_cpu_seconds_total"]) / (t1 - t0)
    return {"latency": {"ffmpeg": summary(latencies(pub.sent, ff.found, since)),
                        "parts": summary(latencies(pub.sent, parts.found, since))},
            "mux_cpu": {"cpu_s_per_s": round(mux, 4), "rooms_per_core": round(1 / mux) if mux else None}}


def measure_hlsjs(node: Node, seconds: float) -> dict:
    from tests import browser
    if not browser.available():
        return {"n": 0, "skipped": "chromium is not installed"}
    page = browser.Browser()
    try:
        page.goto(f"http://{node.admin[0]}:{node.admin[1]}/listen?room=live&transport=hls")
        delays, deadline = [], time.monotonic() + seconds + 20
        while time.monotonic() < deadline and len(delays) < seconds * 2:
            st = json.loads(page.evaluate("JSON.stringify(window.relayListener)") or "null") or {}
            if st.get("state") == "playing" and st.get("delaySec"):
                delays.append(float(st["delaySec"]))
            time.sleep(0.5)
        return summary(delays)
    finally:
        page.close()


def measure_requests(node: Node, clients: int, seconds: float) -> dict:
    text = urllib.request.urlopen(node.url("/rooms/live/opus/index.m3u8"), timeout=10).read().decode()
    start = tuple(int(x) for x in re.search(r'PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"', text).groups())
    m0 = scrape(node.admin)
    logs = asyncio.run(crowd(*node.hls, "/rooms/live/opus", start, clients, 10_000, seconds))  # type: ignore[arg-type]
    m1 = scrape(node.admin)
    reqs = sum(v for k, v in m1.items() if k.startswith("relay_hls_requests_total")) - \
        sum(v for k, v in m0.items() if k.startswith("relay_hls_requests_total"))
    cpu = m1["relay_process_cpu_seconds_total"] - m0["relay_process_cpu_seconds_total"]
    return {"clients": clients, "requests": int(reqs), "node_cpu_s": round(cpu, 3),
            "requests_per_core_second": round(reqs / cpu) if cpu else None,
            "parts_per_client": statistics.median(len(log.parts) for log in logs)}


def measure_proxy(node: Node, workdir: Path, sizes: list[int], parts: int) -> list[dict]:
    nginx, proxy = start_nginx(workdir, node.hls)
    out = []
    try:
        for n in sizes:
            text = urllib.request.urlopen(node.url("/rooms/live/opus/index.m3u8"), timeout=10).read().decode()
            start = tuple(int(x) for x in re.search(r'PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"',
                                                    text).groups())
            m0 = scrape(node.admin)
            logs = asyncio.run(crowd(*proxy, "/rooms/live/opus", start, n, parts, 30))  # type: ignore[arg-type]
            m1 = scrape(node.admin)
            kinds = ("blocking", "part")
            seen = {k: m1.get(f'relay_hls_requests_total{{kind="{k}"}}', 0)
                    - m0.get(f'relay_hls_requests_total{{kind="{k}"}}', 0) for k in kinds}
            out.append({"clients": n, "complete": sum(len(log.parts) == parts for log in logs),
                        "node_requests_per_part": round(sum(seen.values()) / parts, 2)})
    finally:
        nginx.terminate()
        nginx.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="about half a minute")
    ap.add_argument("--out", help="the JSON file (default bench/results/hls.json)")
    args = ap.parse_args()
    raise_fd_limit(4096)
    seconds = 8.0 if args.smoke else 30.0
    with tempfile.TemporaryDirectory() as d:
        node = Node(Path(d))
        pub = BeepPublisher(node.ingest, 600)     # stopped when the bench ends
        pub.start()
        try:
            out = measure_latency_and_mux(node, pub, seconds)
            out["latency"]["hls.js"] = measure_hlsjs(node, 5 if args.smoke else 20)
            out["requests"] = measure_requests(node, 50 if args.smoke else 200, 3 if args.smoke else 8)
            out["proxy"] = measure_proxy(node, Path(d), [10, 100] if args.smoke else [10, 100, 1000],
                                         5 if args.smoke else 10)
        finally:
            pub.stop.set()
            node.stop()
    out["machine"] = {"cpus": os.cpu_count(), "smoke": args.smoke}
    path = Path(args.out) if args.out else RESULTS / "hls.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    lat = out["latency"]
    print("| measure | figure |\n| --- | --- |")
    for name in ("ffmpeg", "hls.js", "parts"):
        s = lat[name]
        what = "samples of its estimate" if name == "hls.js" else "beeps"
        print(f"| glass to glass, {name} | p50 {s.get('p50_s')} s (p10 {s.get('p10_s')}, p90 {s.get('p90_s')}; "
              f"{s['n']} {what}) |")
    print(f"| mux + AAC CPU per room | {out['mux_cpu']['cpu_s_per_s']} core-s/s "
          f"(~{out['mux_cpu']['rooms_per_core']} rooms per core) |")
    r = out["requests"]
    print(f"| HLS requests per core-second | {r['requests_per_core_second']} ({r['clients']} clients direct) |")
    for p in out["proxy"]:
        print(f"| behind nginx, {p['clients']} clients | {p['node_requests_per_part']} node requests per part, "
              f"{p['complete']}/{p['clients']} clients got every part |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
