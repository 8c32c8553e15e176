"""Join tokens: JWT (HS256) with room, role and expiry, so any backend that
shares the secret can mint them. Open mode admits anyone, for local demos."""
from __future__ import annotations

import secrets
import time

import jwt

from relay.wire.protocol import Reason

# listen: a listener; publish: a speaker; relay: a node taking a room from
# another node (minted by nodes that share the cluster's secret)
ROLES = ("listen", "publish", "relay", "host")   # host: speaks, and moderates its room


class TokenError(Exception):
    """A token that does not admit this join; `reason` is the REJECT reason."""

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.reason = reason


def mint(secret: str, room: str, role: str = "listen", ttl_s: float = 3600.0,
         now: float | None = None, speaker: str = "", name: str = "") -> str:
    """A signed token for `room` and `role`, valid for `ttl_s` seconds. A
    speaker's (role publish) may carry its id (`sub`) and display name; a
    node's (role relay) carries the node's id as `sub`."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(secret.encode()) < 32:
        raise ValueError("the secret must be at least 32 bytes (HS256)")
    issued = int(time.time() if now is None else now)
    # jti: tokens minted in the same second differ (a session limit per
    # token must count one holder's sessions, not everyone minted then)
    claims: dict[str, object] = {"room": room, "role": role, "iat": issued, "exp": issued + int(ttl_s),
                                 "jti": secrets.token_urlsafe(12)}
    if speaker:
        claims["sub"] = speaker
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256")


class Auth:
    """Checks join tokens. mode 'jwt' needs a secret; mode 'open' admits
    every JOIN (and says so in the logs at start-up)."""

    def __init__(self, mode: str, secret: str = "") -> None:
        if mode not in ("jwt", "open"):
            raise ValueError("auth must be 'jwt' or 'open'")
        if mode == "jwt" and not secret:
            raise ValueError("auth 'jwt' needs a secret")
        self.mode, self._secret = mode, secret

    def check(self, token: str, room: str, role: str | tuple[str, ...] = "listen") -> str:
        """The role `token` admits in `room` (one of `role`, if a tuple);
        raise TokenError unless it admits one. Open mode admits `role`
        (the first, if a tuple)."""
        return str(self.claims(token, room, role)["role"])

    def claims(self, token: str, room: str, role: str | tuple[str, ...] = "listen") -> dict:
        """check(), returning the token's claims (role, and for a speaker
        `sub` and `name` if the token has them). Open mode has none but the
        role it admits."""
        roles = (role,) if isinstance(role, str) else role
        if self.mode == "open":
            return {"role": roles[0]}
        try:
            claims = jwt.decode(token, self._secret, algorithms=["HS256"],
                                options={"require": ["exp", "room", "role"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired", Reason.EXPIRED_TOKEN) from None
        except jwt.InvalidTokenError as e:
            raise TokenError(f"bad token: {e}", Reason.BAD_TOKEN) from None
        if claims.get("room") != room:
            raise TokenError("token is for another room", Reason.WRONG_ROOM)
        if claims.get("role") not in roles:
            raise TokenError(f"token role is not {' or '.join(map(repr, roles))}", Reason.WRONG_ROLE)
        return claims
