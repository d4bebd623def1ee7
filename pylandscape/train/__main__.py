"""python -m pylandscape.train: the same as python -m pylandscape train."""
import sys

from .cli import main

sys.exit(main())
