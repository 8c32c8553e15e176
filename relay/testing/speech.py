"""Speech to publish and a measure of how much of it came through: a
synthetic voice from ffmpeg's flite filter, and the correlation of what a
listener decoded with it, at the best alignment."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

RATE = 48_000
TEXT = ("The quick brown fox jumps over the lazy dog. A relay carries one voice to many listeners. "
        "Every part arrives in order, and the speech stays clear.")


def make_speech(path: Path, repeats: int = 3) -> Path:
    """Write `repeats` times a few seconds of synthetic speech to `path`
    (48 kHz mono WAV); raises FileNotFoundError without ffmpeg."""
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise FileNotFoundError("ffmpeg is not installed (Debian: apt-get install ffmpeg)")
    one = path.with_suffix(".once.wav")
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", f"flite=text='{TEXT}':voice=slt",
                    "-ar", str(RATE), "-ac", "1", str(one)], check=True)
    subprocess.run([ffmpeg, "-v", "error", "-y", "-stream_loop", str(repeats - 1), "-i", str(one),
                    "-ar", str(RATE), "-ac", "1", str(path)], check=True)
    return path


def read_pcm(path: Path | str) -> np.ndarray:
    """Any file ffmpeg reads, as 48 kHz mono floats."""
    ffmpeg = shutil.which("ffmpeg") or "ffmpeg"
    raw = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", str(RATE), "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<i2").astype(np.float64)


def best_correlation(source: np.ndarray, heard: np.ndarray) -> tuple[float, int]:
    """(Pearson correlation, lag in samples) of `heard` against the stretch
    of `source` it lines up with best (found by FFT cross-correlation)."""
    if len(heard) == 0 or len(source) < len(heard):
        return 0.0, 0
    n = 1 << int(np.ceil(np.log2(len(source) + len(heard))))
    xc = np.fft.irfft(np.fft.rfft(source, n) * np.conj(np.fft.rfft(heard, n)), n)
    lag = int(np.argmax(xc[:len(source) - len(heard) + 1]))
    a = source[lag:lag + len(heard)]
    if a.std() == 0 or heard.std() == 0:
        return 0.0, lag
    return float(np.corrcoef(a, heard)[0, 1]), lag
