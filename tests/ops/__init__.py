"""The operator's side: admin port, drain, the event log, Prometheus, reload, `relay check`, deploy files."""
