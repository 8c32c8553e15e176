"""The cluster: rooms taken from upstream nodes, and the Redis directory that picks redirects and parents.

May import relay.wire, relay._core and relay.client (an upstream is joined as a listener).
"""
