"""Listeners: UDP sessions and admission, the sender threads, QUIC and WebTransport (quic/), and the page they load.

May import relay.wire, relay._core, relay.ingest and relay.stage.
"""
