"""A host's actions on its room, and the HTTP API that takes them.

    GET  /stage/ROOM                      the stage: speakers (muted or not), raised hands, invited,
                                          removed, ended
    POST /stage/ROOM/mute?speaker=ID      out of the mix until unmuted (its page shows it)
    POST /stage/ROOM/unmute?speaker=ID
    POST /stage/ROOM/invite?sub=SUB       that listener may speak with the token it has: its
                                          sessions are sent INVITE, and its hand goes down
    POST /stage/ROOM/audience?speaker=ID  a speaker back to the audience (REJECT audience)
    POST /stage/ROOM/remove?sub=SUB       every session of that subject ends (REJECT removed) and
                                          it is refused until its token expires
    POST /stage/ROOM/unban?sub=SUB        let a removed subject back
    POST /stage/ROOM/end                  the room ends for everyone (REJECT room_ended)

Each takes `Authorization: Bearer TOKEN`, a token with role `host` for the
room: none is 401, any other 403 with the reason. The page (/host), `relay
host` and an app's backend all use this API. Every change reaches the
room's sessions on their own transport: SPEAKERS at once for a mute, a
REJECT for an ending, an INVITE for an invitation.
"""
from __future__ import annotations

import json
import time
import urllib.parse
from typing import Callable

import jwt

from relay._core import Core
from relay.listeners.quic.endpoint import QuicEndpoint
from relay.listeners.session import UDP, Send, Session, Tell
from relay.listeners.sessions import Sessions
from relay.listeners.udp import ListenerPort
from relay.stage.moderation import REMOVED_DEFAULT_S
from relay.wire.protocol import Reason, Reject, encode
from relay.wire.stage_msgs import Invite, Reactions, StageMessage
from relay.wire.tokens import TokenError

Response = tuple[str, str, bytes]
ACTIONS = ("mute", "unmute", "invite", "audience", "remove", "unban", "end")


def _json(status: str, body: dict) -> Response:
    return status, "application/json", json.dumps(body).encode()


class Hosting:
    """Carries out hosts' actions on one node, and sends its rooms'
    reactions once a second."""

    def __init__(self, sessions: Sessions, core: Core, udp: ListenerPort, quic: QuicEndpoint | None,
                 tell: Callable[[list[Tell]], int]) -> None:
        self.sessions, self.core, self.udp, self.quic = sessions, core, udp, quic
        self.tell = tell            # ended sessions told why, on their transports
        self._reacted_at = 0.0

    def say(self, s: Session, msg: StageMessage) -> None:
        """One message to one session, on its own transport."""
        if s.transport == UDP:
            self.udp.send([Send(s.key, encode(msg))])  # type: ignore[arg-type]   # a UDP session's key is its address
        elif self.quic is not None:
            self.quic.say(s, msg)

    def tick(self, now: float) -> None:
        """Once a second: each room's reactions, summed, one message to
        every session of the room (never one per reaction)."""
        if now - self._reacted_at < 1.0:
            return
        self._reacted_at = now
        for room, counts in self.sessions.moderation.take_reactions().items():
            state = self.sessions.rooms.get(room)
            if state is None:
                continue
            msg = Reactions(counts)
            data = encode(msg)
            stages = self.sessions.stages
            minus = stages.minus_rooms(room) if stages is not None else []
            for index in (state.index, *minus):
                self.core.room_send(index, self.udp.out_fd, data)
            if self.quic is not None:
                self.quic.tell_room(room, msg)

    def handle(self, method: str, path: str, query: str, bearer: str) -> Response:
        """One request under /stage/: the host's token checked, then the action."""
        parts = [urllib.parse.unquote(p) for p in path[len("/stage/"):].split("/")]
        room, action = parts[0], (parts[1] if len(parts) > 1 else "")
        if room not in self.sessions.rooms or len(parts) > 2:
            return _json("404 Not Found", {"error": f"no room {room!r}"})
        if not bearer:
            return _json("401 Unauthorized", {"error": "a host's token is needed: Authorization: Bearer TOKEN"})
        try:
            claims = self.sessions.auth.claims(bearer, room, ("host",))
        except TokenError as e:
            return _json("403 Forbidden", {"error": f"not a host of room {room!r}: {e}"})
        if not action:
            if method != "GET":
                return _json("405 Method Not Allowed", {"error": "GET the stage, POST an action"})
            return _json("200 OK", self.state(room))
        if method != "POST" or action not in ACTIONS:
            return _json("404 Not Found" if action not in ACTIONS else "405 Method Not Allowed",
                         {"error": f"actions are POST /stage/ROOM/{{{','.join(ACTIONS)}}}"})
        args = {k: v[0] for k, v in urllib.parse.parse_qs(query).items()}
        status, said = self.act(room, action, args.get("speaker") or args.get("sub") or "",
                                str(claims.get("sub") or ""))
        if status.startswith("200"):
            self.sessions.moderation.actions[action] += 1
        return _json(status, {"room": room, "action": action, "result" if status.startswith("200") else "error": said})

    def state(self, room: str) -> dict:
        """What the host's page shows."""
        r = self.sessions.moderation.room(room)
        stages = self.sessions.stages
        return {"room": room, "ended": r.ended,
                "speakers": stages.speakers(room) if stages is not None else [],
                "hands": [{"sub": h.sub, "name": h.name, "since": round(h.since, 3)} for h in r.hands.values()],
                "invited": sorted(r.invited), "removed": {s: round(u) for s, u in r.removed.items()},
                "muted": sorted(r.muted)}

    def act(self, room: str, action: str, target: str, host: str) -> tuple[str, str]:
        """Carry out one action; (status line, what happened or why not)."""
        m = self.sessions.moderation
        r = m.room(room)
        if action == "end":
            r.ended = True
            n = self._end(room, lambda s: True, Reason.ROOM_ENDED)
            return "200 OK", f"room ended: {n} sessions told"
        if not target:
            return "400 Bad Request", f"{action} needs ?speaker=ID or ?sub=SUB"
        if action in ("mute", "unmute"):
            stages = self.sessions.stages
            if stages is None or not stages.mute(room, target, action == "mute"):
                return "404 Not Found", f"{target!r} is not on the stage"
            (r.muted.add if action == "mute" else r.muted.discard)(target)
            return "200 OK", f"{target!r} {action}d"
        if action == "invite":
            r.invited.add(target)
            told = [s for s in self._of(room, target) if s.role == "listen"]
            for s in told:
                r.hands.pop(s.key, None)
                self.say(s, Invite())
            return "200 OK", f"{target!r} may speak: {len(told)} sessions invited"
        if action == "audience":
            r.invited.discard(target)
            n = self._end(room, lambda s: s.sub == target and s.role == "publish", Reason.AUDIENCE)
            return ("200 OK", f"{target!r} back in the audience ({n} sessions)") if n else \
                ("404 Not Found", f"{target!r} is not on the stage")
        if action == "remove":
            if target == host:
                return "400 Bad Request", "a host does not remove itself"
            r.removed[target] = max([_expiry(s.token) for s in self._of(room, target)]
                                    or [time.time() + REMOVED_DEFAULT_S])
            r.invited.discard(target)
            n = self._end(room, lambda s: s.sub == target, Reason.REMOVED)
            return "200 OK", f"{target!r} removed: {n} sessions ended, refused until its token expires"
        r.removed.pop(target, None)   # unban
        return "200 OK", f"{target!r} may join again"

    def _of(self, room: str, sub: str) -> list[Session]:
        return [s for s in self.sessions.table.values() if s.room == room and s.sub == sub]

    def _end(self, room: str, which: Callable[[Session], bool], reason: Reason) -> int:
        # nodes below are sessions too: an ended room ends on them, and they tell their own
        gone = [s for s in list(self.sessions.table.values()) if s.room == room and which(s)]
        for s in gone:
            self.sessions.end(s.key, "left")
        if self.sessions.stages is not None:
            self.sessions.stages.tell_now()
        return self.tell([Tell(s, Reject(reason, proof=s.session_id)) for s in gone]) if gone else 0


def _expiry(token: str) -> float:
    """When a (verified) token expires; without one, a day from now."""
    try:
        return float(jwt.decode(token, options={"verify_signature": False}).get("exp") or 0) \
            or time.time() + REMOVED_DEFAULT_S
    except jwt.InvalidTokenError:
        return time.time() + REMOVED_DEFAULT_S
