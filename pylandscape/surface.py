"""`python -m pylandscape.surface`: loss surfaces (the code lives in pylandscape.landscape)."""
import sys

from .landscape.surface_cli import main

if __name__ == "__main__":
    sys.exit(main())
