"""[node] egress settings: how listeners' audio leaves the node.

`egress = "sendmmsg"` (the default) sends through the listener socket;
`egress = "xdp"` builds the frames itself and hands them to an AF_XDP
socket on `xdp_interface` (docs/xdp.md). Parsed here so that config.py
only asks for the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KEYS = {"egress", "xdp_interface", "xdp_queue", "xdp_frames", "xdp_zerocopy"}


@dataclass(frozen=True)
class XdpConfig:
    """Where the AF_XDP egress sends: shard k uses queue `queue + k` of `interface`."""
    interface: str
    queue: int = 0           # the first TX queue; one per sender shard from there
    frames: int = 4096       # UMEM frames per shard (2 KiB each)
    zerocopy: bool = False   # ask for the driver's zero-copy mode instead of copy mode


def xdp_config(node: dict[str, Any], error: type[Exception]) -> XdpConfig | None:
    """The AF_XDP settings of a [node] table, or None for sendmmsg. Raises
    `error` with one line naming the key to fix."""
    egress = node.get("egress", "sendmmsg")
    if egress not in ("sendmmsg", "xdp"):
        raise error(f'[node] egress: "sendmmsg" or "xdp", not {egress!r}')
    if egress == "sendmmsg":
        return None
    iface = node.get("xdp_interface")
    if not isinstance(iface, str) or not iface or len(iface) > 15:
        raise error('[node] xdp_interface: the interface name AF_XDP sends on (needed with egress = "xdp")')
    queue = node.get("xdp_queue", 0)
    if not isinstance(queue, int) or isinstance(queue, bool) or not 0 <= queue < 4096:
        raise error(f"[node] xdp_queue: the first TX queue, 0..4095, not {queue!r}")
    frames = node.get("xdp_frames", 4096)
    if not isinstance(frames, int) or isinstance(frames, bool) or frames < 64 or frames > 1 << 20 \
            or frames & (frames - 1):
        raise error(f"[node] xdp_frames: a power of two from 64 to 1048576, not {frames!r}")
    zerocopy = node.get("xdp_zerocopy", False)
    if not isinstance(zerocopy, bool):
        raise error(f"[node] xdp_zerocopy: true or false, not {zerocopy!r}")
    return XdpConfig(iface, queue, frames, zerocopy)
