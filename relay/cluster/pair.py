"""An origin pair: two origins take one publisher's stream, and agree on
one numbering for the room, so nodes below that take a parent from each
can merge the copies and lose nothing when either origin dies.

A publisher sends one encode to both origins (`relay publish --to A --to B`,
or ffmpeg's tee muxer). ffmpeg's outputs each pick their own SSRC, sequence
and timestamp bases, but the Opus payloads are the same bytes. Each origin
hears the other's room as a relay listener, and puts every packet the
publisher sends it into the numbering its partner already gave the same
payload, once it has found that offset. Where the partner has no stream,
the origin numbers the stream itself, and the partner then follows it.

Which one numbers a new stream when both start at once is configured: the
room's `pair_lead` origin does, and the other holds its own copies back
(up to LEADER_WAIT_S, while the leader's copies carry the audio) until it
has the offset. A restarted origin whose partner is live holds likewise
and follows the partner's numbering: the room never has two. So when
either dies, the other's room goes on in the same numbering, and nothing
below notices.
"""
from __future__ import annotations

import struct
from collections import OrderedDict

from relay.wire.rtp import rtp_payload

# a payload this short (Opus silence, DTX comfort noise) repeats too often
# to say which packet it is
MIN_MATCH = 16
# the same offset, found this many times in a row, is taken
CONFIRM = 3
# a periodic sound (a test tone) repeats whole payloads: 440 Hz in 20 ms
# frames every fifth packet. Of the places a payload was seen, the copy of
# the same packet is the one that arrived at about the same time (both
# copies left the publisher together); one that arrived more than this
# much earlier or later is another packet with the same bytes
MATCH_WINDOW_S = 0.05
# the leader's packets remembered for matching: a few seconds of 20 ms audio
RECENT = 256
# a partner that has sent nothing for this long has no stream
PARTNER_QUIET_S = 1.0
# how long an origin holds its copies back while its partner is live but
# the offset is not found yet, or (the follower, at start) for the leader
# to number the stream
LEADER_WAIT_S = 1.0


class Aligner:
    """Puts the publisher's packets, as they reach this origin, into the
    numbering its partner gave the same payloads, under the room's relay
    SSRC; or numbers them itself where the partner has no stream. Sans-IO:
    it takes packets and returns packets."""

    def __init__(self, ssrc: int, lead: bool) -> None:
        self.ssrc, self.lead = ssrc, lead
        # the partner's packets, and the publisher's as they reached us, by
        # payload, each with where and when it was seen: whichever copy of a
        # packet comes second finds the first
        self._recent: OrderedDict[bytes, list[Seen]] = OrderedDict()
        self._mine: OrderedDict[bytes, list[Seen]] = OrderedDict()
        self.offset: tuple[int, int] | None = None    # (seq, ts) to add to the publisher's
        self.own = False                               # numbering the stream itself (no leader)
        self._candidate: tuple[int, int] | None = None
        self._seen = 0
        self._in_ssrc: int | None = None
        self._partner_at: float | None = None
        self._waiting_since: float | None = None   # holding copies back since
        self._started = False                      # has had a stream of its own since it started
        self.held = 0          # copies held back while the offset was not known

    def partner_packet(self, packet: bytes, now: float) -> None:
        """A packet of the partner's room, as the partner numbered it."""
        parsed = rtp_payload(packet)
        if parsed is None:
            return
        seq, ts, payload, _ = parsed
        self._partner_at = now
        if len(payload) >= MIN_MATCH:
            _remember(self._recent, payload, (seq, ts, now))
            mine = _nearest(self._mine.get(payload), now)
            if mine is not None:
                self._found(((seq - mine[0]) & 0xFFFF, (ts - mine[1]) & 0xFFFFFFFF))

    def translate(self, packet: bytes, now: float) -> bytes | None:
        """The publisher's `packet` in the room's one numbering, or None to
        hold it back (the partner's copy carries it). RTCP on the same port
        (a sender report, a BYE) passes as it is: it is no packet of the
        stream, and the core reads it."""
        if len(packet) > 1 and 72 <= packet[1] & 0x7F <= 76:
            return packet
        parsed = rtp_payload(packet)
        if parsed is None:
            return None
        seq, ts, payload, _ = parsed
        ssrc = struct.unpack_from("!I", packet, 8)[0]
        if ssrc != self._in_ssrc:               # a new publisher stream: its bases are new
            self._in_ssrc, self.offset, self._candidate, self._seen = ssrc, None, None, 0
            self._waiting_since = now
        if len(payload) >= MIN_MATCH:
            _remember(self._mine, payload, (seq, ts, now))
            match = _nearest(self._recent.get(payload), now)
            if match is not None:
                self._found(((match[0] - seq) & 0xFFFF, (match[1] - ts) & 0xFFFFFFFF))
        if self.offset is None:
            if self._hold(now):
                self.held += 1
                return None
            self.offset, self.own = (0, 0), True
        self._started = True
        return (packet[:2] + struct.pack("!HII", (seq + self.offset[0]) & 0xFFFF,
                                         (ts + self.offset[1]) & 0xFFFFFFFF, self.ssrc) + packet[12:])

    def _found(self, offset: tuple[int, int]) -> None:
        """One copy matched: the same offset CONFIRM times in a row is taken."""
        if offset == self.offset:
            return
        self._seen = self._seen + 1 if offset == self._candidate else 1
        self._candidate = offset
        if self._seen >= CONFIRM:
            self.offset, self.own = offset, False

    def _hold(self, now: float) -> bool:
        """Whether to hold a copy back rather than number the stream here."""
        partner_live = self._partner_at is not None and now - self._partner_at <= PARTNER_QUIET_S
        waited = 0.0 if self._waiting_since is None else now - self._waiting_since
        if waited > LEADER_WAIT_S:
            return False
        if not self.lead:
            return True                     # the leader numbers it, or proves absent by waiting
        # the leader numbers a new stream at once, unless it has just
        # started and finds its partner live: that stream already has a numbering
        return partner_live and not self._started


Seen = tuple[int, int, float]     # (sequence number, timestamp, when it arrived)


def _remember(table: OrderedDict[bytes, list[Seen]], payload: bytes, seen: Seen) -> None:
    places = table.get(payload)
    if places is None:
        table[payload] = places = []
    places.append(seen)
    del places[:-8]                  # a periodic sound's last few repeats are all that matter
    table.move_to_end(payload)
    if len(table) > RECENT:
        table.popitem(last=False)


def _nearest(places: list[Seen] | None, now: float) -> Seen | None:
    """The place a payload was seen at about the same time as now, if one
    was, and only one: else the bytes say nothing of which packet it is."""
    if not places:
        return None
    near = [p for p in places if abs(now - p[2]) <= MATCH_WINDOW_S]
    return near[0] if len(near) == 1 else None
