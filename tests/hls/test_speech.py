"""ffmpeg reads the node's LL-HLS URL and decodes the speech that was
published into the room: what it hears follows the source closely, in
both renditions."""
from __future__ import annotations

import subprocess

from relay.testing.speech import best_correlation, make_speech, read_pcm
from tests.conftest import need
from tests.hls.conftest import publish

HEARD_S = 4.0


def test_ffmpeg_decodes_the_rooms_speech_from_ll_hls(hls_relay, tmp_path):
    speech = make_speech(tmp_path / "speech.wav", repeats=4)
    publisher = publish(hls_relay.relay, str(speech), lavfi=False)
    readers = {}
    try:
        hls_relay.wait_parts("aac", 3, tag="#EXTINF", timeout=30)
        for rendition in ("opus", "aac"):
            readers[rendition] = subprocess.Popen(
                [need("ffmpeg"), "-v", "error", "-y", "-i", hls_relay.base(rendition) + "/index.m3u8",
                 "-t", str(HEARD_S), "-ac", "1", "-ar", "48000", str(tmp_path / f"{rendition}.wav")])
        codes = {r: p.wait(60) for r, p in readers.items()}
    finally:
        for p in readers.values():
            if p.poll() is None:
                p.kill()
        publisher.terminate()
        publisher.wait(10)
    assert codes == {"opus": 0, "aac": 0}
    source = read_pcm(speech)
    for rendition in readers:
        got = read_pcm(tmp_path / f"{rendition}.wav")
        assert len(got) >= 0.9 * HEARD_S * 48000, rendition
        corr, _ = best_correlation(source, got[4800:])     # past the decoder's start-up
        print(f"{rendition}: correlation {corr:.3f}")
        assert corr >= 0.9, f"{rendition}: correlation {corr:.3f} with the source"
