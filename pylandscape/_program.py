"""How the command-line entry points end: without the interpreter's teardown of torch's objects.

At the end of a 2,000-snapshot `python -m pylandscape.mds` on a 2-core VM, Python's own finalisation
(clearing every module and deallocating torch's ~10^6 objects one by one) took 0.3-0.45 s after the
last file was written; ``os._exit`` after the exit handlers takes 0.05 s. Only for processes that are
programs (``python -m ...``, the console script): a caller of ``main()`` goes on as usual.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading


def end_process(rc) -> None:
    """Exit with rc: atexit handlers run and the standard streams are flushed as at a normal exit, then the
    process ends without the interpreter's finalisation. A normal ``sys.exit`` when another non-daemon thread
    is still running (the interpreter would wait for it), when this Python has no ``atexit._run_exitfuncs``,
    or with PYLANDSCAPE_FAST_EXIT=0."""
    rc = 0 if rc is None else rc
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate()
              if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if (not isinstance(rc, int) or others or run_exit_handlers is None
            or os.environ.get("PYLANDSCAPE_FAST_EXIT", "1") == "0"):
        sys.exit(rc)
    run_exit_handlers()  # Ray's and multiprocessing's shutdown, logging's flush, coverage's save, ...
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it
            pass
    os._exit(rc)
