"""QUIC and WebTransport listeners: aioquic owns the handshake and streams, the core their audio and ACKs.

May import what relay.listeners may, and relay.listeners' own modules.
"""
