"""The wire's tests: the control protocol and the config file."""
