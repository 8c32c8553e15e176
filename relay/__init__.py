"""relay: a live-audio fan-out relay (RTP/Opus in, many listeners out)."""

__version__ = "0.1.0"
