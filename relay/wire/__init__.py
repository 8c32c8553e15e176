"""What crosses the network and the config file: the listener control
protocol, join tokens, socket addresses and the node's TOML config. Pure
data and parsing; imported by the node and the clients alike."""
