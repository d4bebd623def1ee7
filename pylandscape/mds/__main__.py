"""python -m pylandscape.mds: see cli.py."""
import sys

from .cli import main

sys.exit(main())
