"""The HLS port as a CDN sees it: types, caching, CORS, keep-alive, HEAD,
blocking reloads answered when their part exists, and bad requests."""
from __future__ import annotations

import http.client
import re
import threading

import pytest

from tests.conftest import stop
from tests.hls.conftest import HlsRelay, publish, start_hls_relay


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One relay with a tone playing, shared by the module's tests."""
    r = start_hls_relay(tmp_path_factory.mktemp("hls-http"))
    p = publish(r.relay, "sine=frequency=660:sample_rate=48000")
    r.wait_parts("opus", 7)
    yield r
    p.terminate()
    p.wait(10)
    assert stop(r.relay.proc) == 0


def newest(r: HlsRelay, rendition: str = "opus") -> tuple[str, int, int]:
    """The playlist, and the preload hint's (msn, part)."""
    _, _, body = r.request(f"/rooms/live/{rendition}/index.m3u8")
    text = body.decode()
    msn, part = re.search(r'PRELOAD-HINT:TYPE=PART,URI="s(\d+)\.(\d+)\.m4s"', text).groups()
    return text, int(msn), int(part)


def test_types_caching_and_cors_are_what_a_cdn_and_a_player_page_need(live):
    text, msn, part = newest(live)
    seg = re.findall(r"^(s\d+\.m4s)$", text, re.M)[0]
    listed_part = re.findall(r'URI="(s\d+\.\d+\.m4s)"', text)[-1]
    cases = {
        "/rooms/live/index.m3u8": ("application/vnd.apple.mpegurl", "max-age=10"),
        "/rooms/live/opus/index.m3u8": ("application/vnd.apple.mpegurl", "max-age=0"),
        "/rooms/live/opus/init.mp4": ("audio/mp4", "immutable"),
        f"/rooms/live/opus/{seg}": ("audio/mp4", "immutable"),
        f"/rooms/live/aac/{listed_part}": ("audio/mp4", "immutable"),
    }
    for path, (ctype, cache) in cases.items():
        status, headers, body = live.request(path)
        assert status == 200, path
        assert headers["content-type"] == ctype, path
        assert cache in headers["cache-control"], path
        assert headers["access-control-allow-origin"] == "*"
        assert int(headers["content-length"]) == len(body) > 0
    status, headers, _ = live.request("/rooms/live/opus/init.mp4", "OPTIONS")
    assert status == 204 and "GET" in headers["access-control-allow-methods"]


def test_keep_alive_and_head(live):
    conn = http.client.HTTPConnection(*live.hls, timeout=10)
    statuses = [live.request("/rooms/live/opus/init.mp4", conn=conn)[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    get = live.request("/rooms/live/opus/init.mp4", conn=conn)
    head = live.request("/rooms/live/opus/init.mp4", "HEAD", conn=conn)
    assert head[0] == 200 and head[2] == b""
    assert head[1]["content-length"] == get[1]["content-length"] == str(len(get[2]))
    assert live.request("/rooms/live/opus/init.mp4", conn=conn)[0] == 200   # still open after HEAD
    conn.close()


@pytest.mark.parametrize("rendition", ["opus", "aac"])
def test_a_blocking_reload_is_answered_when_its_part_exists(live, rendition):
    _, msn, part = newest(live, rendition)
    got: dict[str, object] = {}

    def ask_part() -> None:
        got["part"] = live.request(f"/rooms/live/{rendition}/s{msn}.{part}.m4s")

    t = threading.Thread(target=ask_part)
    t.start()
    status, headers, body = live.request(f"/rooms/live/{rendition}/index.m3u8?_HLS_msn={msn}&_HLS_part={part}")
    t.join(10)
    assert status == 200 and f'URI="s{msn}.{part}.m4s"' in body.decode()
    assert "max-age=1" in headers["cache-control"]
    part_status, _, data = got["part"]          # type: ignore[misc]
    assert part_status == 200 and data[4:8] == b"moof"
    # a whole segment asked for with _HLS_msn alone: answered once it is complete
    status, _, body = live.request(f"/rooms/live/{rendition}/index.m3u8?_HLS_msn={msn + 1}")
    assert status == 200 and f"\ns{msn + 1}.m4s\n" in body.decode()


@pytest.mark.parametrize("query,needle", [
    ("_HLS_msn={far}", "past the last segment"),
    ("_HLS_msn=-1", "whole numbers"),
    ("_HLS_msn=1e9", "whole numbers"),
    ("_HLS_msn=99999999999999999999999", "whole numbers"),
    ("_HLS_msn={msn}&_HLS_part=900", "_HLS_part is below"),
    ("_HLS_part=1", "needs _HLS_msn"),
    ("_HLS_skip=NO", "YES or v2"),
])
def test_absurd_reload_parameters_get_400_at_once(live, query, needle):
    _, msn, _ = newest(live)
    status, headers, body = live.request("/rooms/live/opus/index.m3u8?" + query.format(far=msn + 3, msn=msn))
    assert status == 400 and needle in body.decode()
    assert headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", ["/rooms/nosuch/index.m3u8", "/rooms/nosuch/opus/index.m3u8",
                                  "/rooms/live/flac/index.m3u8", "/rooms/live/opus/s1.999.m4s", "/",
                                  "/rooms/live/opus/s1.m4s"])
def test_unknown_rooms_and_files_get_404(live, path):
    assert live.request(path)[0] == 404


def test_a_request_that_is_not_http_is_answered_400_and_closed(live):
    import socket
    with socket.create_connection(live.hls, timeout=5) as s:
        s.sendall(b"HELLO\r\n\r\n")
        got = b""
        while chunk := s.recv(1000):
            got += chunk
        assert got.startswith(b"HTTP/1.1 400") and b"Connection: close" in got


def test_a_delta_update_is_served_once_the_playlist_is_long_enough_to_skip(live):
    live.wait_parts("opus", 9, tag="#EXTINF")
    _, msn, part = newest(live)
    status, _, body = live.request(f"/rooms/live/opus/index.m3u8?_HLS_msn={msn}&_HLS_part={part}&_HLS_skip=YES")
    text = body.decode()
    assert status == 200 and "#EXT-X-SKIP:SKIPPED-SEGMENTS=" in text and f"s{msn}.{part}.m4s" in text
