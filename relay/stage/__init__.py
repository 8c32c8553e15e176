"""The stage: speakers on a room's stage, the mixer (mix-minus) on its worker thread, the loop side that admits them.

May import relay.wire and relay._core only.
"""
