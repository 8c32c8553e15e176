"""`relay demo`: the whole data path on loopback in one command.

Starts a real `relay serve` on the embedded default config, a tone
publisher, one real `relay listen` that saves its audio to an Ogg file,
and a crowd of listeners counted in C; prints a live progress line and
then a table of what was delivered.
"""
from __future__ import annotations

import array
import os
import shutil
import signal
import subprocess
import sys
import time

from relay.wire.config import load
from relay.testing.loadgen import LoopbackCrowd, histogram_quantile, scrape, wait_ready


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


def run_demo(listeners: int = 2000, seconds: float = 10.0, out: str = "demo-listener.ogg",
             frame_ms: int = 20) -> int:
    """Run the demo; returns a process exit code."""
    cfg = load()
    room = cfg.rooms[0]
    admin = cfg.admin
    assert admin is not None, "the embedded config has an admin port"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    py = [sys.executable, "-m", "relay"]
    procs: list[subprocess.Popen] = []
    relay = subprocess.Popen(py + ["--log-level", "warning", "serve"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs.append(relay)
    crowd = None
    try:
        if not wait_ready(admin, relay):
            err = (relay.stderr.read().decode().strip().splitlines()
                   if relay.stderr is not None and relay.poll() is not None else [])
            print("demo: the relay did not start" + (f": {err[-1]}" if err else ""), file=sys.stderr)
            return 1
        print(f"relay up on {cfg.listen[0]}:{cfg.listen[1]}; publishing a 440 Hz tone into "
              f"room '{room.name}' and joining {listeners} listeners ...", flush=True)
        if cfg.quic:
            print(f"a browser can listen too, while it runs: http://{admin[0]}:{admin[1]}/listen?room={room.name}",
                  flush=True)
        procs.append(subprocess.Popen(py + ["publish", "--to", f"{room.ingest[0]}:{room.ingest[1]}",
                                            "--duration", str(seconds + 6),
                                            "--frame-ms", str(frame_ms),
                                            # keep long frames inside the default ring slot
                                            "--bitrate", "64000" if frame_ms <= 20 else "32000"],
                                      env=env, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        one = subprocess.Popen(py + ["listen", "--room", room.name, "--server",
                                     f"{cfg.listen[0]}:{cfg.listen[1]}", "--out", out,
                                     "--duration", str(seconds)],
                               env=env, stderr=subprocess.PIPE)
        procs.append(one)
        crowd = LoopbackCrowd(max(0, listeners - 1), cfg.listen, room.name)
        joined = crowd.join()
        print(f"joined {joined.accepted + 1} listeners in {joined.seconds:.2f} s"
              + (f", rejected {joined.rejected}" if joined.rejected else "")
              + (f", {joined.unanswered} unanswered" if joined.unanswered else ""), flush=True)
        before = scrape(admin)
        received_before = crowd.crowd.totals()["received"]
        t_start = time.monotonic()
        last = [received_before, t_start]

        def progress(elapsed: float) -> None:
            t = crowd.crowd.totals()
            now = time.monotonic()
            rate = (t["received"] - last[0]) / (now - last[1])
            last[:] = [t["received"], now]
            loss = 100 * t["lost"] / t["expected"] if t["expected"] else 0.0
            sys.stdout.write(f"\r  {elapsed:4.0f}s  listeners hearing audio {t['heard']:>6}/"
                             f"{crowd.crowd.size}  delivered {rate:>10,.0f} pkt/s  loss {loss:5.2f}%")
            sys.stdout.flush()

        crowd.run(seconds, on_second=progress)
        elapsed = time.monotonic() - t_start
        after = scrape(admin)
        print()
        totals = crowd.crowd.totals()
        crowd.leave()
        one.wait(timeout=seconds + 10)
        one_err = one.stderr.read().decode().strip() if one.stderr is not None else ""
        sent = after.get("relay_packets_out_total", 0) - before.get("relay_packets_out_total", 0)
        cpu = after.get("relay_process_cpu_seconds_total", 0) - before.get("relay_process_cpu_seconds_total", 0)
        p50 = histogram_quantile(after, "relay_fanout_latency_seconds", 0.5)
        p99 = histogram_quantile(after, "relay_fanout_latency_seconds", 0.99)
        loss = 100 * totals["lost"] / totals["expected"] if totals["expected"] else 100.0
        drops = {k.split('"')[1]: v - before.get(k, 0) for k, v in after.items()
                 if k.startswith("relay_drops_total{") and v - before.get(k, 0) > 0}
        hz = _tone_hz(out) if os.path.exists(out) else None
        rows = [
            ("listeners joined", f"{joined.accepted + 1} of {listeners}"),
            ("listeners that heard audio", f"{totals['heard'] + (1 if 'received' in one_err else 0)}"),
            ("packets/s sent by the relay", f"{sent / elapsed:,.0f}"),
            ("packets/s received by the crowd",
             f"{(totals['received'] - received_before) / elapsed:,.0f}"),
            ("loss (sequence gaps at listeners)", f"{loss:.3f}%"),
            ("packets dropped in the relay", ", ".join(f"{k}: {v:.0f}" for k, v in drops.items())
             or "none"),
            ("fan-out latency p50 / p99",
             f"{p50 * 1e3:.2f} ms / {p99 * 1e3:.2f} ms" if p50 is not None and p99 is not None
             else "n/a"),
            ("relay CPU per second of wall time", f"{cpu / elapsed:.2f} s"),
            ("one listener's audio", f"{out}" + (f" (tone of {hz:.0f} Hz)" if hz else "")),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"| {'measure':<{width}} | value")
        print(f"|{'-' * (width + 2)}|{'-' * 30}")
        for k, v in rows:
            print(f"| {k:<{width}} | {v}")
        print(f"play it: ffplay {out}   (or open it in a browser)")
        ok = totals["heard"] == crowd.crowd.size and joined.accepted == listeners - 1
        return 0 if ok else 1
    finally:
        if crowd is not None:
            crowd.close()
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
