"""A network namespace joined to this one by a veth pair, for the AF_XDP
tests and bench: the relay sends on our end, receivers run in the
namespace. Needs root; everything it makes is removed on exit, also after
a failure."""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Veth:
    """Our end (`local`, in this namespace) and the peer (`peer`, in `netns`)."""
    netns: str
    local: str
    peer: str
    local4: str
    peer4: str
    local6: str
    peer6: str

    def run(self, *argv: str, **kw) -> subprocess.Popen:
        """Start a process inside the namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kw)

    def python(self, module: str, *args: str, **kw) -> subprocess.Popen:
        """Run `python -m module args` inside the namespace, with this checkout on its path."""
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        return self.run(sys.executable, "-m", module, *args, env=env, **kw)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


def can_make() -> str:
    """"" if this process can make namespaces and veths, else why not."""
    if os.geteuid() != 0:
        return "needs root (a network namespace and a veth pair)"
    try:
        subprocess.run(["ip", "-V"], check=True, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "needs iproute2 (ip)"
    return ""


@contextmanager
def veth_pair(tag: str = "x", queues: int = 1, subnet: int = 0) -> Iterator[Veth]:
    """Make namespace `relay-<tag><pid>` and a veth pair with IPv4 and IPv6
    addresses (10.201.<subnet>.1/.2, fd00:201:<subnet>::1/::2, no DAD), with
    `queues` TX and RX queues each; remove both on exit."""
    n = f"{tag}{os.getpid() % 100000}"
    v = Veth(f"relay-{n}", f"rx{n}a", f"rx{n}b", f"10.201.{subnet}.1", f"10.201.{subnet}.2",
             f"fd00:201:{subnet}::1", f"fd00:201:{subnet}::2")
    try:
        _ip("netns", "add", v.netns)
        _ip("link", "add", v.local, "numtxqueues", str(queues), "numrxqueues", str(queues), "type", "veth",
            "peer", "name", v.peer, "netns", v.netns, "numtxqueues", str(queues), "numrxqueues", str(queues))
        _ip("addr", "add", f"{v.local4}/24", "dev", v.local)
        _ip("addr", "add", f"{v.local6}/64", "dev", v.local, "nodad")
        _ip("link", "set", v.local, "up")
        _ip("-n", v.netns, "addr", "add", f"{v.peer4}/24", "dev", v.peer)
        _ip("-n", v.netns, "addr", "add", f"{v.peer6}/64", "dev", v.peer, "nodad")
        _ip("-n", v.netns, "link", "set", v.peer, "up")
        _ip("-n", v.netns, "link", "set", "lo", "up")
        yield v
    finally:
        subprocess.run(["ip", "link", "del", v.local], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", v.netns], capture_output=True, timeout=10)
