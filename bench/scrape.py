"""How much a Prometheus scrape of a busy node costs: time and size of
/metrics with many listeners in many rooms.

    .venv/bin/python bench/scrape.py --listeners 10000 --rooms 100

Writes bench/results/scrape.json. Reports; never fails on a timing.
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import time
from pathlib import Path

from prometheus_client import generate_latest

from relay.wire.addr import to_sockaddr
from relay.wire.config import load
from relay.ops.metrics import registry_for
from relay.node import Node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listeners", type=int, default=10_000)
    ap.add_argument("--rooms", type=int, default=100)
    ap.add_argument("--scrapes", type=int, default=50)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "scrape.json"))
    args = ap.parse_args()

    rooms = "\n".join(f'[[room]]\nname = "room-{i}"\ningest = "127.0.0.1:{20000 + i}"\n'
                      f'sources = ["127.0.0.1"]\n' for i in range(args.rooms))
    cfg = load(f'[node]\nauth = "open"\nmax_listeners = {args.listeners}\nmax_rooms = {args.rooms}\n{rooms}')
    node = Node(cfg)  # sockets are not bound: the scrape only reads counters
    for i in range(args.listeners):
        room = node.rooms[f"room-{i % args.rooms}"]
        slot = node.core.listener_add(room.index, to_sockaddr(("127.0.0.1", 10000 + i % 50000)),
                                      i, 0, 0)
        assert slot >= 0
    registry = registry_for(node.collector)
    generate_latest(registry)  # warm up
    times, size = [], 0
    for _ in range(args.scrapes):
        t0 = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - t0)
        size = len(body)
    result = {
        "listeners": args.listeners, "rooms": args.rooms, "scrapes": args.scrapes,
        "room_label_limit": cfg.room_label_limit,
        "scrape_seconds_median": statistics.median(times),
        "scrape_seconds_max": max(times),
        "bytes": size,
        "series": sum(1 for line in body.decode().splitlines() if line and not line.startswith("#")),
        "machine": f"{platform.machine()}, {socket.gethostname()}, Python {platform.python_version()}",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"scrape of {args.listeners} listeners in {args.rooms} rooms: "
          f"{result['scrape_seconds_median'] * 1e3:.2f} ms median, {size} bytes, "
          f"{result['series']} series -> {args.out}")


if __name__ == "__main__":
    main()
