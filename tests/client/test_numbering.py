"""A listener's count of missing packets follows the stream's numbering:
a numbering that starts again (a new publisher stream behind an origin
pair) is neither a gap of thousands nor old packets to drop."""
from __future__ import annotations

from relay.client.listen import ListenClient
from relay.wire.protocol import Accept
from tests.rtp import rtp

SSRC = 0x1234


def _client() -> tuple[ListenClient, list[bytes]]:
    got: list[bytes] = []
    c = ListenClient("127.0.0.1:9", "live", sink=got.append, nack=False)
    c._session = Accept(b"12345678", SSRC, 5000, 15000, origin=(0, 0))
    return c, got


def test_a_numbering_that_starts_again_is_followed_not_counted() -> None:
    for restart_at in (10, 40_000):            # behind the old numbering, and far ahead of it
        c, got = _client()
        for k in range(50):
            c._datagram(rtp(30_000 + k, 960 * k, SSRC, b"x" * 20))
        for k in range(50):
            c._datagram(rtp(restart_at + k, 960 * k, SSRC, b"y" * 20))
        c._flush_held()
        assert len(got) == 100 and c.stats.lost == 0 and c.stats.duplicates == 0, (restart_at, c.stats)


def test_a_real_gap_is_still_counted_and_an_old_packet_still_dropped() -> None:
    c, got = _client()
    for k in list(range(20)) + list(range(30, 50)):      # ten missing
        c._datagram(rtp(500 + k, 960 * k, SSRC, b"x" * 20))
    c._datagram(rtp(505, 0, SSRC, b"x" * 20))            # a copy already delivered
    c._flush_held()
    assert c.stats.lost == 10 and c.stats.duplicates == 1 and len(got) == 40
