"""Ingest's tests: who may publish, SDP interop with real players, bad input on the ingest port."""
