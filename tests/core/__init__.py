"""The compiled core's tests: rings, the model oracle, safety, egress, shards, the QUIC protection."""
