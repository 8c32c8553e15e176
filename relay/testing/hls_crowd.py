"""Many LL-HLS clients at once, on one event loop: each follows a rendition
part by part as a player does (a blocking playlist reload, then the part it
names) over its own keep-alive connection. For the CDN test and the HLS
bench: what each client got, and when."""
from __future__ import annotations

import asyncio
import re
import time
import zlib
from dataclasses import dataclass, field

_PART = re.compile(r'#EXT-X-PART:[^\n]*URI="(s(\d+)\.(\d+)\.m4s)"')
_HINT = re.compile(r'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"')


@dataclass
class ClientLog:
    """What one client got: (part URI, CRC-32 of its bytes, when it had it) in order, and errors."""
    parts: list[tuple[str, int, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
               path: str) -> tuple[int, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


def next_position(playlist: str, msn: int, part: int) -> tuple[int, int] | None:
    """The part after (msn, part) in a playlist: the next one listed, else the preload hint."""
    listed = [(int(m), int(p)) for _, m, p in _PART.findall(playlist)]
    later = [x for x in listed if x > (msn, part)]
    if later:
        return min(later)
    hint = _HINT.search(playlist)
    return (int(hint[1]), int(hint[2])) if hint else None


async def follow(host: str, port: int, base: str, start: tuple[int, int], parts: int,
                 deadline: float) -> ClientLog:
    """One client: from `start`, `parts` parts of the rendition at `base`
    (its URL path, ending in the rendition's name), until `deadline`."""
    log = ClientLog()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        log.errors.append(f"connect: {e}")
        return log
    msn, part = start
    try:
        while len(log.parts) < parts and time.monotonic() < deadline:
            status, body = await _get(reader, writer, host, f"{base}/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
            if status != 200:
                log.errors.append(f"playlist {msn}.{part}: {status}")
                await asyncio.sleep(0.2)
                continue
            uri = f"s{msn}.{part}.m4s"
            status, data = await _get(reader, writer, host, f"{base}/{uri}")
            if status != 200:
                log.errors.append(f"{uri}: {status}")
                await asyncio.sleep(0.2)
                continue
            log.parts.append((uri, zlib.crc32(data), time.monotonic()))
            nxt = next_position(body.decode(), msn, part)
            if nxt is None:
                log.errors.append(f"no part after {uri}")
                break
            msn, part = nxt
    except (OSError, asyncio.IncompleteReadError, ValueError) as e:
        log.errors.append(f"{type(e).__name__}: {e}")
    finally:
        writer.close()
    return log


async def crowd(host: str, port: int, base: str, start: tuple[int, int], clients: int, parts: int,
                seconds: float) -> list[ClientLog]:
    """`clients` clients following from `start` at once, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    return list(await asyncio.gather(*(follow(host, port, base, start, parts, deadline) for _ in range(clients))))
