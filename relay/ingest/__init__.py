"""Ingest: publishers' sockets, SRTP opening, and the rules for who may publish into a room.

May import relay.wire and relay._core only.
"""
