"""python -m pylandscape.mds: see cli.py."""
import gc

from .._program import end_process
from .cli import main

# The imports' objects (torch's, ~10^6) into the collector's permanent generation: the interpreter's
# collections at exit then skip them (0.6-0.7 s less at the end of a 2,000-snapshot run on a 2-core VM).
# Here, not in main(): a process that calls main() and goes on (tests) keeps its collector as it was.
gc.freeze()
end_process(main())  # without the interpreter's teardown (_program.py)
