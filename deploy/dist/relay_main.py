"""Entry point of the self-contained `relay` executable (make dist)."""
from relay.cli import main

if __name__ == "__main__":
    main()
