"""`relay host`: a host runs its room's stage from a terminal, through the
node's HTTP API (relay/ops/hosting.py), with a token of role `host`.

    relay host --server http://node:7080 --room panel stage        # who is on stage, raised hands
    relay host --server http://node:7080 --room panel mute ann
    relay host ... invite lis-42 | audience ann | remove troll-7 | unban troll-7 | unmute ann | end
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request

ACTIONS = ("stage", "mute", "unmute", "invite", "audience", "remove", "unban", "end")
# which query parameter each action's target goes in
TARGET = {"mute": "speaker", "unmute": "speaker", "audience": "speaker", "invite": "sub", "remove": "sub",
          "unban": "sub"}


class HostError(Exception):
    """The node refused (or could not be reached): one readable line."""


def call(server: str, room: str, token: str, action: str, target: str = "", timeout: float = 10.0) -> dict:
    """One request to the node's stage API; its JSON answer. Raises HostError."""
    base = server.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    path = f"/stage/{urllib.parse.quote(room, safe='')}"
    if action != "stage":
        path += f"/{action}"
        if action in TARGET:
            path += "?" + urllib.parse.urlencode({TARGET[action]: target})
    req = urllib.request.Request(base + path, method="GET" if action == "stage" else "POST",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read()).get("error", "")
        except ValueError:
            why = ""
        raise HostError(f"{base}: {e.code} {e.reason}" + (f": {why}" if why else "")) from None
    except (urllib.error.URLError, OSError) as e:
        raise HostError(f"{base}: cannot reach the node's HTTP port: {getattr(e, 'reason', e)}") from None


def describe(stage: dict) -> str:
    """The stage as a host reads it in a terminal."""
    lines = [f"room {stage['room']!r}" + (" (ended)" if stage["ended"] else "")]
    for s in stage["speakers"]:
        lines.append(f"  on stage  {s['name']} ({s['id']})" + ("  muted" if s["muted"] else "")
                     + ("  speaking" if s["speaking"] else ""))
    now = time.time()
    for h in stage["hands"]:
        lines.append(f"  hand up   {h['name']} ({h['sub']}), {now - h['since']:.0f} s")
    if stage["invited"]:
        lines.append(f"  invited   {', '.join(stage['invited'])}")
    if stage["removed"]:
        lines.append(f"  removed   {', '.join(stage['removed'])}")
    return "\n".join(lines)
