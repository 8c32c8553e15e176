"""The client side: `relay listen` over UDP or QUIC, `relay publish`, and
the Ogg Opus writer. Clients speak the wire protocol and never import the
node."""
