"""`relay demo`: the whole data path on loopback in one command.

Starts a real `relay serve` on the embedded default config (on ports that
are free on this machine, so a relay already running here is never the one
measured), a tone publisher, one real `relay listen` that saves its audio
to an Ogg file, and a crowd of listeners counted in C; prints a live
progress line and then a table of what was delivered.
"""
from __future__ import annotations

import array
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.testing.loadgen import LoopbackCrowd, JoinResult, free_port, histogram_quantile, scrape, wait_ready
from relay.wire.config import DEFAULT_TOML, NodeConfig, load

PY = [sys.executable, "-m", "relay"]


def _tone_hz(path: str) -> float | None:
    """Decode with ffmpeg and estimate a pure tone's frequency from its zero
    crossings (None without ffmpeg or audio)."""
    if not shutil.which("ffmpeg"):
        return None
    pcm = subprocess.run(["ffmpeg", "-v", "error", "-i", path, "-f", "s16le", "-ac", "1",
                          "-ar", "48000", "-"], capture_output=True).stdout
    samples = array.array("h", pcm[: len(pcm) // 2 * 2])
    if len(samples) < 4800:
        return None
    crossings = sum(1 for a, b in zip(samples, samples[1:], strict=False) if (a < 0) != (b < 0))
    return crossings / 2 / (len(samples) / 48000)


def demo_config(directory: str) -> tuple[str, NodeConfig]:
    """The embedded default config with every port moved to one that is
    free now; returns the file written into `directory` and its contents."""
    text = DEFAULT_TOML
    for port, kind in (("7000", socket.SOCK_DGRAM), ("7080", socket.SOCK_STREAM),
                       ("7443", socket.SOCK_DGRAM), ("5004", socket.SOCK_DGRAM)):
        text = text.replace(f'"127.0.0.1:{port}"', f'"127.0.0.1:{free_port(kind)}"')
    path = Path(directory) / "demo.toml"
    path.write_text(text)
    return str(path), load(text)


def _start(cmd: list[str], env: dict[str, str], procs: list[subprocess.Popen], **kw) -> subprocess.Popen:
    p = subprocess.Popen(PY + cmd, env=env, **kw)
    procs.append(p)
    return p


def _progress(crowd: LoopbackCrowd, received_before: int, one: socket.socket):
    """A live line, once a second: listeners hearing audio, rate, loss. The
    listeners are the crowd and the one `relay listen`, as in the table;
    `one` receives what that listener forwards, which says it hears."""
    last = [received_before, time.monotonic()]
    one_heard = [False]

    def line(elapsed: float) -> None:
        t = crowd.crowd.totals()
        while True:
            try:
                one.recv(2048)
            except BlockingIOError:
                break
            one_heard[0] = True
        now = time.monotonic()
        rate = (t["received"] - last[0]) / (now - last[1])
        last[:] = [t["received"], now]
        loss = 100 * t["lost"] / t["expected"] if t["expected"] else 0.0
        sys.stdout.write(f"\r  {elapsed:4.0f}s  listeners hearing audio {t['heard'] + one_heard[0]:>6}/"
                         f"{crowd.crowd.size + 1}  delivered {rate:>10,.0f} pkt/s  loss {loss:5.2f}%")
        sys.stdout.flush()
    return line


def _table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value")
    print(f"|{'-' * (width + 2)}|{'-' * 30}")
    for k, v in rows:
        print(f"| {k:<{width}} | {v}")


def _report(listeners: int, joined: JoinResult, totals: dict[str, int], one_heard: bool,
            before: dict[str, float], after: dict[str, float], received_before: int,
            elapsed: float, out: str) -> None:
    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    p50 = histogram_quantile(after, "relay_fanout_latency_seconds", 0.5)
    p99 = histogram_quantile(after, "relay_fanout_latency_seconds", 0.99)
    loss = 100 * totals["lost"] / totals["expected"] if totals["expected"] else 100.0
    drops = {k.split('"')[1]: delta(k) for k in after if k.startswith("relay_drops_total{") and delta(k) > 0}
    hz = _tone_hz(out) if os.path.exists(out) else None
    _table([
        ("listeners joined", f"{joined.accepted + 1} of {listeners}"),
        ("listeners that heard audio", f"{totals['heard'] + (1 if one_heard else 0)}"),
        ("packets/s sent by the relay", f"{delta('relay_packets_out_total') / elapsed:,.0f}"),
        ("packets/s received by the crowd", f"{(totals['received'] - received_before) / elapsed:,.0f}"),
        ("loss (sequence gaps at listeners)", f"{loss:.3f}%"),
        ("packets dropped in the relay", ", ".join(f"{k}: {v:.0f}" for k, v in drops.items()) or "none"),
        ("fan-out latency p50 / p99",
         f"{p50 * 1e3:.2f} ms / {p99 * 1e3:.2f} ms" if p50 is not None and p99 is not None else "n/a"),
        ("relay CPU per second of wall time", f"{delta('relay_process_cpu_seconds_total') / elapsed:.2f} s"),
        ("one listener's audio", f"{out}" + (f" (tone of {hz:.0f} Hz)" if hz else "")),
    ])
    print(f"play it: ffplay {out}   (or open it in a browser)")


def run_demo(listeners: int = 2000, seconds: float = 10.0, out: str = "demo-listener.ogg",
             frame_ms: int = 20) -> int:
    """Run the demo; returns a process exit code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen] = []
    crowd = None
    forwarded: socket.socket | None = None
    with tempfile.TemporaryDirectory(prefix="relay-demo-") as tmp:
        path, cfg = demo_config(tmp)
        room, admin = cfg.rooms[0], cfg.admin
        assert admin is not None and room.ingest is not None, "the embedded config has an admin and an ingest port"
        server = f"{cfg.listen[0]}:{cfg.listen[1]}"
        try:
            relay = _start(["--log-level", "warning", "serve", "-c", path], env, procs,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if not wait_ready(admin, relay):
                err = (relay.stderr.read().decode().strip().splitlines()
                       if relay.stderr is not None and relay.poll() is not None else [])
                print("demo: the relay did not start" + (f": {err[-1]}" if err else ""), file=sys.stderr)
                return 1
            print(f"relay up on {server}; publishing a 440 Hz tone into room '{room.name}' "
                  f"and joining {listeners} listeners ...", flush=True)
            if cfg.quic:
                print(f"a browser can listen too, while it runs: "
                      f"http://{admin[0]}:{admin[1]}/listen?room={room.name}", flush=True)
            # long frames at 32 kbit/s stay inside the default ring slot
            _start(["publish", "--to", f"{room.ingest[0]}:{room.ingest[1]}", "--duration", str(seconds + 6),
                    "--frame-ms", str(frame_ms), "--bitrate", "64000" if frame_ms <= 20 else "32000"],
                   env, procs, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            forwarded = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            forwarded.bind(("127.0.0.1", 0))
            forwarded.setblocking(False)
            one = _start(["listen", "--room", room.name, "--server", server, "--out", out,
                          "--forward", f"127.0.0.1:{forwarded.getsockname()[1]}",
                          "--duration", str(seconds)], env, procs, stderr=subprocess.PIPE)
            crowd = LoopbackCrowd(max(0, listeners - 1), cfg.listen, room.name)
            joined = crowd.join()
            print(f"joined {joined.accepted + 1} listeners in {joined.seconds:.2f} s"
                  + (f", rejected {joined.rejected}" if joined.rejected else "")
                  + (f", {joined.unanswered} unanswered" if joined.unanswered else ""), flush=True)
            before = scrape(admin)
            received_before = crowd.crowd.totals()["received"]
            t_start = time.monotonic()
            crowd.run(seconds, on_second=_progress(crowd, received_before, forwarded))
            elapsed = time.monotonic() - t_start
            after = scrape(admin)
            print()
            totals = crowd.crowd.totals()
            crowd.leave()
            one.wait(timeout=seconds + 10)
            one_err = one.stderr.read().decode().strip() if one.stderr is not None else ""
            _report(listeners, joined, totals, "received" in one_err, before, after, received_before,
                    elapsed, out)
            return 0 if totals["heard"] == crowd.crowd.size and joined.accepted == listeners - 1 else 1
        finally:
            if crowd is not None:
                crowd.close()
            if forwarded is not None:
                forwarded.close()
            _stop(procs)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
