"""SRTP ingest (RFC 3711): a room with a key takes only the packets that
authenticate with it, which is what ffmpeg's `srtp://` output and
GStreamer's `srtpenc` send (AES_CM_128_HMAC_SHA1_80, a 30-byte master key
and salt, given to them in base64).

libsrtp, through pylibsrtp, does the cryptography: it checks each packet's
tag, tracks the rollover counter, refuses a packet it has already seen
(a replay window of 128 packets) and decrypts. The plain RTP it returns
goes to the core like any other datagram, so a listener cannot tell an
SRTP room from a plain one. SRTCP on the same port is opened the same way,
so a publisher's BYE still releases the room.

Holding the key is the publisher's proof: an authenticated stream may take
over the room after the live one has been quiet briefly, where a plain-RTP
room waits for a BYE or for the operator. Everything refused is counted
by reason; nothing here raises on bad input.
"""
from __future__ import annotations

from collections import Counter

from pylibsrtp import Error, Policy, Session

# the reasons an SRTP datagram is dropped (relay_srtp_drops_total)
SRTP_DROPS = ("auth", "replay", "malformed")


class SrtpIngest:
    """One room's SRTP receive context."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        policy = Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND,
                        srtp_profile=Policy.SRTP_PROFILE_AES128_CM_SHA1_80)
        self._session = Session(policy)
        self.drops: Counter[str] = Counter()

    def open(self, data: bytes) -> bytes | None:
        """The plain RTP (or RTCP) inside one datagram, or None when it does
        not authenticate, is a replay, or is not SRTP at all (counted)."""
        if len(data) < 12 or data[0] >> 6 != 2:
            self.drops["malformed"] += 1
            return None
        try:
            if 72 <= data[1] & 0x7F <= 76:    # SRTCP multiplexed onto the port (RFC 5761)
                return self._session.unprotect_rtcp(data)
            return self._session.unprotect(data)
        except Error as e:
            why = str(e)
            self.drops["replay" if "replay" in why else "auth" if "authentication" in why else "malformed"] += 1
            return None
        except ValueError:
            # libsrtp refuses a datagram longer than it handles (over 1,500
            # bytes): no SRTP packet of a voice is that long
            self.drops["malformed"] += 1
            return None
