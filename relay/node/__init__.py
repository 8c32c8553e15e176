"""A relay node (`relay serve`): the wiring around the compiled core, the
UDP and QUIC adapters that move bytes, the sans-IO session policy, load
measures, the admin HTTP port, reload and metrics."""
