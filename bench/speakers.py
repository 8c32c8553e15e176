"""Rooms of several speakers on a stage (docs/speakers.md), measured.

    .venv/bin/python bench/speakers.py            # about a minute
    .venv/bin/python bench/speakers.py --smoke    # seconds

Reports, into bench/results/speakers.json:
  cpu        the stage's CPU per second of audio with 1, 2, 4, 8 and 16
             speakers talking at once (SRTP opened, jitter buffers, decode,
             mix, limiter, one encode for the room and one per talking
             speaker for its mix-minus), and with 16 on stage of whom 2
             talk (the silent ones are sent the room's packet), and so how
             many such rooms one core mixes. A
             Stage driven on a simulated clock in this process, timed with
             the thread's own CPU clock: the machine's other load does not
             count. One speaker is the pass-through: no decode, no encode.
  join_phases  the mix's added delay for a speaker that sends at each of
             PHASES_MS within the frame the stage ticks on (the other
             speaker set the ticks): p50, p99 and max over every phase.
  latency    mouth to ear on loopback: a speaker's RTP packet sent to the
             listener's RTP packet carrying the same audio received (the
             same frame of the stage's timeline), p50 and p99, for one
             speaker (passed through) and for several (mixed); "added" is
             the mix's p50/p99 minus the pass-through's p50. A real node in
             this process, real UDP sockets, a listener in the core.
Every loop here is bounded in count and time.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pylibsrtp import Policy, Session as SrtpSession  # noqa: E402

from relay.client.publish import RtpPacketizer, encode_tone  # noqa: E402
from relay.client.speak import SpeakerClient, with_level  # noqa: E402
from relay.node import Node  # noqa: E402
from relay.stage.stage import FRAME_NS, Stage  # noqa: E402
from relay.testing.loadgen import free_port  # noqa: E402
from relay.wire.addr import to_sockaddr  # noqa: E402
from relay.wire.config import load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TONES = [220.0 * (1 + k / 4) for k in range(16)]
PHASES_MS = [0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5]   # where in the 20 ms frame speaker 0 sends


def _srtp(key: bytes) -> SrtpSession:
    return SrtpSession(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND,
                              srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80))


def stage_cpu(speakers: int, seconds: float, on_stage: int = 0) -> dict:
    """CPU seconds per second of audio of one stage with `speakers` talking
    (and `on_stage` - `speakers` more on the stage, silent)."""
    import os
    stage = Stage("bench", 0, os.urandom)
    keys, streams = [], []
    for k in range(speakers, max(on_stage, speakers)):
        stage.add(k, f"s{k}", f"Speaker {k}", os.urandom(30), 1 + k)
    for k in range(speakers):
        key = os.urandom(30)
        stage.add(k, f"s{k}", f"Speaker {k}", key, 1 + k)
        # each speaker's packets, ready to send: SRTP is the sender's cost, not the stage's
        rtp, srtp = RtpPacketizer(), _srtp(key)
        packets = [srtp.protect(with_level(rtp.packet(p), 14)) for p in encode_tone(TONES[k], seconds)]
        keys.append(k)
        streams.append(packets)
    frames = int(seconds * 50)
    now = 1_000_000_000
    stage.tick_ns = now
    t0 = time.thread_time_ns()
    out = 0
    for n in range(frames):
        for k, packets in zip(keys, streams, strict=True):
            out += len(stage.on_packet(k, packets[n], now + k * 1000))
        now += FRAME_NS
        while stage.tick_ns <= now:
            out += len(stage.tick(now))
    cpu = (time.thread_time_ns() - t0) / 1e9
    per_s = cpu / (frames / 50)
    return {"speakers": speakers, "on_stage": max(on_stage, speakers), "mode": stage.mode,
            "encodes_per_frame": round(stage.mixer.encodes / max(1, stage.frames_mixed), 2),
            "cpu_per_audio_second": round(per_s, 5),
            "rooms_per_core": round(1 / per_s, 1) if per_s else None, "packets_out": out,
            "frames_mixed": stage.frames_mixed, "clipped": stage.mixer.clipped}


async def latency(speakers: int, seconds: float, phase_ms: float = 0.0) -> dict:
    """Mouth-to-ear delays (ms) of speaker 0's audio with `speakers` on
    stage. With several, the others start a second earlier (the stage's
    ticks follow them) and speaker 0 sends `phase_ms` after them in each
    20 ms frame: where a speaker's join lands within the frame."""
    port = free_port()
    node = Node(load(f'[node]\nlisten = "127.0.0.1:{port}"\nadmin = ""\nauth = "open"\nmax_load = 0\n'
                     'max_machine_load = 0\n[[room]]\nname = "stage"\n'))
    await node.start()
    loop = asyncio.get_running_loop()
    ear = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ear.bind(("127.0.0.1", 0))
    ear.setblocking(False)
    heard: dict[int, int] = {}          # listener timestamp -> when received
    room = node.rooms["stage"].index
    # a listener in the core with no offsets of its own: its timestamps are the stage's
    node.core.listener_add(room, to_sockaddr(ear.getsockname()), 1, 0, 0)

    def on_ear() -> None:
        while True:
            try:
                data = ear.recv(2048)
            except BlockingIOError:
                return
            heard[struct.unpack_from("!I", data, 4)[0]] = time.monotonic_ns()
    loop.add_reader(ear.fileno(), on_ear)
    clients = [SpeakerClient(f"127.0.0.1:{port}", "stage") for _ in range(speakers)]
    for c in clients:
        await c.join()
    sent: dict[int, int] = {}           # speaker 0's RTP timestamp -> when sent
    payloads = [encode_tone(TONES[k], 1.0) for k in range(speakers)]
    srtps = [c._srtp() for c in clients]
    rtps = [RtpPacketizer() for _ in clients]
    frames = int(seconds * 50)
    lead = 50 if speakers > 1 else 0          # the others' first second, before speaker 0 joins in
    # (when, speaker, frame): the others on the frame grid, speaker 0 `phase_ms` after it
    plan = sorted([((n + lead) * 0.02 + (phase_ms / 1000 if k == 0 else 0.0), k, n)
                   for k in range(speakers) for n in range(-lead if k else 0, frames)])
    start = time.monotonic()
    for at, k, n in plan:
        delay = start + at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ts = rtps[k].ts
        pkt = srtps[k].protect(with_level(rtps[k].packet(payloads[k][n % 50]), 14))
        if k == 0:
            sent[ts] = time.monotonic_ns()
        clients[k]._send(pkt)
    await asyncio.sleep(0.3)
    stage = node.stages.worker.stages["stage"]
    voice = stage.voices[clients[0]._transport.get_extra_info("sockname")]
    assert voice.offset is not None
    base = stage.room.ts_base
    delays = []
    for ts, t_sent in sent.items():
        position = voice.extend(ts) + voice.offset
        got = heard.get((base + position) & 0xFFFFFFFF)
        if got is not None:
            delays.append((got - t_sent) / 1e6)
    loop.remove_reader(ear.fileno())
    ear.close()
    for c in clients:
        c.close()
    node.close()
    delays.sort()
    # the first second: the stage settles (a speaker placed, the mix begun)
    steady = delays[50:] or delays
    return {"speakers": speakers, "phase_ms": phase_ms, "mode": stage.mode, "frames": len(sent),
            "matched": len(delays), "p50_ms": round(statistics.median(steady), 2),
            "p99_ms": round(steady[min(len(steady) - 1, int(0.99 * len(steady)))], 2), "delays_ms": steady}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="seconds, not a minute")
    ap.add_argument("--out", help="the JSON file (default bench/results/speakers.json)")
    args = ap.parse_args()
    cpu_s, lat_s = (2.0, 2.0) if args.smoke else (20.0, 8.0)
    cpu = [stage_cpu(n, cpu_s) for n in (1, 2, 4, 8, 16)] + [stage_cpu(2, cpu_s, on_stage=16)]
    lat = [asyncio.run(latency(n, lat_s)) for n in (1, 2, 4)]
    base = lat[0]["p50_ms"]
    for row in lat[1:]:
        row["added_p50_ms"] = round(row["p50_ms"] - base, 2)
        row["added_p99_ms"] = round(row["p99_ms"] - base, 2)
    # where a speaker's join lands within the 20 ms frame decides its delay:
    # speaker 0 of 2 at phases across the frame, all its frames together
    phases = [asyncio.run(latency(2, lat_s, phase)) for phase in PHASES_MS[::4 if args.smoke else 1]]
    every = sorted(d - base for row in phases for d in row["delays_ms"])
    spread = {"phases_ms": [r["phase_ms"] for r in phases], "frames": len(every),
              "added_p50_ms": round(statistics.median(every), 2),
              "added_p99_ms": round(every[min(len(every) - 1, int(0.99 * len(every)))], 2),
              "added_max_ms": round(every[-1], 2),
              "added_p50_by_phase_ms": [round(r["p50_ms"] - base, 2) for r in phases]}
    for row in lat + phases:
        del row["delays_ms"]
    out = {"command": "bench/speakers.py" + (" --smoke" if args.smoke else ""), "cpu": cpu, "latency": lat,
           "join_phases": spread}
    path = Path(args.out) if args.out else RESULTS / "speakers.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print("talking  on stage  mode  encodes/frame  CPU per audio second  rooms per core")
    for r in cpu:
        print(f"{r['speakers']:7d}  {r['on_stage']:8d}  {r['mode']:4s}  {r['encodes_per_frame']:13}  "
              f"{r['cpu_per_audio_second']:20.4f}  {r['rooms_per_core']:14}")
    print("speakers  mode  mouth-to-ear p50/p99 ms  added by the mix p50/p99 ms")
    for r in lat:
        added = f"{r.get('added_p50_ms', 0):.1f} / {r.get('added_p99_ms', 0):.1f}" if "added_p50_ms" in r else "-"
        print(f"{r['speakers']:8d}  {r['mode']:4s}  {r['p50_ms']:8.1f} / {r['p99_ms']:<8.1f}       {added}")
    print(f"the mix's added delay across join phases {spread['phases_ms']} ms: p50 {spread['added_p50_ms']}, "
          f"p99 {spread['added_p99_ms']}, max {spread['added_max_ms']} ms "
          f"(per phase p50: {spread['added_p50_by_phase_ms']})")


if __name__ == "__main__":
    main()
