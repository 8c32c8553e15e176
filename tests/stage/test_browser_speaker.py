"""A speaker in a browser: Chromium's speaker page (/speak) with a fake
microphone fed from a speech-like file joins the stage over WebTransport,
beside a CLI speaker's 660 Hz tone. `relay listen` hears both: the speech
correlates with its source, the tone's peak is there; and the page plays
its return, the stage without its own voice.

With the browser's voice processing on (the page's default: echo
cancellation, noise suppression, gain control) the waveform is reshaped
(a correlation of about 0.5 with the source) while what is said is not:
its 20 ms loudness envelope is compared. With `?processing=off` the
waveform itself is, one second at a time (0.98 to 0.997 per second in a
run), and the median second must reach 0.9."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from tests import browser
from tests.conftest import best_correlation, need, speechlike_wav, stop
from tests.listeners.conftest import quic_relay, wait_state
from tests.stage.conftest import STAGE, speaker, token
from tests.stage.test_stage import finish, listener, pcm_of, shares

SPEECH_S = 6.0


def without_tone(x: np.ndarray, hz: float = 660.0, width: float = 25.0) -> np.ndarray:
    """`x` with the band around the tone cut out, so speech can be compared alone."""
    spectrum = np.fft.rfft(x)
    bins = np.fft.rfftfreq(len(x), 1 / 48000)
    spectrum[(bins > hz - width) & (bins < hz + width)] = 0
    return np.fft.irfft(spectrum, len(x))


def envelope(x: np.ndarray, window: int = 960) -> np.ndarray:
    """RMS per 20 ms: the syllables, whatever phase the processing left."""
    m = len(x) // window
    return np.sqrt((x[:m * window].reshape(m, window) ** 2).mean(axis=1))


def envelope_correlation(source: np.ndarray, heard: np.ndarray, max_lag: int = 5 * 48000) -> float:
    """The correlation of the loudness envelopes, at the lag where the waveforms fit best."""
    n = len(heard)
    spectrum = np.fft.irfft(np.fft.rfft(heard, 2 * n) * np.conj(np.fft.rfft(source, 2 * n)))
    lag = int(np.argmax(spectrum[:max_lag]))
    a, b = envelope(source), envelope(heard[lag:])
    m = min(len(a), len(b))
    return float(np.corrcoef(a[:m], b[:m])[0, 1])


@pytest.mark.parametrize("processing", ["on", "off"])
def test_a_browser_speaker_is_heard_beside_a_cli_speaker(tmp_path, processing: str) -> None:
    need("ffmpeg")
    speech = tmp_path / "speech.wav"
    source = speechlike_wav(speech, SPEECH_S)
    relay, _server, _cert = quic_relay(tmp_path, auth="jwt", extra_room=STAGE)
    room = tmp_path / "room.ogg"
    page = None
    procs = []
    try:
        lis = listener(relay, SPEECH_S + 6, room)
        bo = speaker(relay, "bo", SPEECH_S + 4)                          # 660 Hz from the CLI
        procs = [lis, bo]
        page = browser.Browser(microphone=str(speech))
        query = "processing=off&" if processing == "off" else ""
        page.goto(relay.url(f"/speak?{query}room=stage&token={token('stage', speaker='cy', name='Cy')}"))
        sp = {}
        deadline = time.monotonic() + 30
        while not sp.get("sent", 0) > 50 * (SPEECH_S - 1):
            assert time.monotonic() < deadline, sp
            sp = json.loads(page.evaluate("JSON.stringify(window.relaySpeaker)") or "{}")
            assert sp.get("state") != "error", sp
            time.sleep(0.25)
        # the page shows the stage (both speakers) and plays its return: the tone, not its own voice
        st = wait_state(page, lambda s: len(s["speakers"]) == 2 and s["framesDecoded"] > 100, timeout=10)
        assert sorted(s["name"] for s in st["speakers"]) == ["Bo", "Cy"], st
        assert st["framesDecoded"] > 100 and 600 < st["pitchHz"] < 720, st
        finish(bo, lis)
        heard = pcm_of(room)
        # the tone's peak is there, beside the speech's lower harmonics
        tone = shares(heard, (175.0, 660.0))
        assert tone[660.0] > 0.1, tone
        speech_only = without_tone(heard)
        if processing == "off":
            # each second at its own best lag, the median: one frame a busy
            # machine concealed must not stand for the whole path
            corr = float(np.median([best_correlation(without_tone(source)[k * 48000:(k + 1) * 48000],
                                                     speech_only, max_lag=len(speech_only) - 48000)
                                    for k in range(int(SPEECH_S) - 1)]))
        else:
            corr = envelope_correlation(without_tone(source), speech_only)
        assert corr >= 0.9, corr
    finally:
        if page is not None:
            page.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
        stop(relay.proc)
