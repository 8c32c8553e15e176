"""Tools for tests, benchmarks and the demo, kept apart from the product:
the Python model of the fan-out (the core's oracle), a crowd of loopback
listeners counted in C, and the `relay demo` runner."""
