"""`python -m pylandscape.hessian`: Hessian spectra (the code lives in pylandscape.landscape)."""
import sys

from .landscape.hessian_cli import main

if __name__ == "__main__":
    sys.exit(main())
