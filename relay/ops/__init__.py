"""The operator's view: the admin HTTP port, Prometheus metrics, the event log, `relay check`, reload plans.

May import relay.wire, relay._core and every role (ingest, stage, listeners, cluster) to read them; no role imports ops.
"""
