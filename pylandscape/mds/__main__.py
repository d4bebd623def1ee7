"""python -m pylandscape.mds: see cli.py."""
import gc

from .._program import end_process
from .cli import main

# The imports' objects (torch's, ~10^6) into the collector's permanent generation: full collections during
# the run skip them, and so do those of a normal interpreter exit (0.6-0.7 s at the end of a 2,000-snapshot
# run on a 2-core VM, before end_process; still taken with PYLANDSCAPE_FAST_EXIT=0 or a thread left running).
# Here, not in main(): a process that calls main() and goes on (tests) keeps its collector as it was.
gc.freeze()
end_process(main())  # without the interpreter's teardown (_program.py)
