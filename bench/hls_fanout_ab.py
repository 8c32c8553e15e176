"""Does LL-HLS change what the node spends per listener? An A/B on one node
configuration: 2,000 loopback UDP listeners and a tone, HLS off, on, off, on
(interleaved, so drift in the machine's load hits both), each run
`--seconds` long. Reports the relay process's CPU per delivered
listener-packet, with the HLS muxing's own CPU (relay_hls_mux_cpu_seconds)
taken out, into bench/results/hls_fanout_ab.json.

    .venv/bin/python bench/hls_fanout_ab.py [--listeners 2000] [--seconds 15]

The core is the same code either way: a room with HLS has one more pull
listener (the tap), one more ring copy per packet among the room's
listeners. What differs beyond that is the muxing on the event loop.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.client.publish import ffmpeg_command  # noqa: E402
from relay.testing.loadgen import LoopbackCrowd, free_port, raise_fd_limit, scrape  # noqa: E402
from tests.conftest import start_relay, stop  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(hls: bool, listeners: int, seconds: float) -> dict:
    d = Path(tempfile.mkdtemp())
    extra = f"workers = 1\nmax_listeners = {listeners + 100}\njoin_rate = 100000\njoin_rate_per_source = 100000\n"
    if hls:
        extra += f'hls = "127.0.0.1:{free_port(socket.SOCK_STREAM)}"\n'
    r = start_relay(d, extra_node=extra)
    crowd = LoopbackCrowd(listeners, r.listen, r.room)
    pub = None
    try:
        if crowd.join().accepted != listeners:
            raise RuntimeError("not every listener was admitted")
        pub = subprocess.Popen(ffmpeg_command("sine=frequency=660", r.ingest, lavfi=True), stdout=subprocess.DEVNULL)
        time.sleep(3)
        m0 = scrape(r.admin)
        crowd.run(seconds)
        m1 = scrape(r.admin)
    finally:
        if pub is not None:
            pub.terminate()
            pub.wait()
        crowd.close()
        stop(r.proc)
    cpu = m1["relay_process_cpu_seconds_total"] - m0["relay_process_cpu_seconds_total"]
    mux = m1.get("relay_hls_mux_cpu_seconds_total", 0) - m0.get("relay_hls_mux_cpu_seconds_total", 0)
    packets = m1["relay_packets_out_total"] - m0["relay_packets_out_total"]
    return {"hls": hls, "cpu_s": round(cpu, 3), "hls_mux_cpu_s": round(mux, 3), "listener_packets": int(packets),
            "us_per_listener_packet_without_mux": round((cpu - mux) / packets * 1e6, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listeners", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    raise_fd_limit(args.listeners + 1000)
    # A B B A: a drift in the machine's load over the runs weighs on both alike
    rows = [run(hls, args.listeners, args.seconds) for hls in (False, True, True, False)]
    for row in rows:
        print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hls_fanout_ab.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
