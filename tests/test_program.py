"""The entry points end with _program.end_process: exit handlers, streams and the code as at a normal exit."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def _run(body: str, env=None):
    code = ("import atexit, os, sys, threading, time\nfrom pylandscape._program import end_process\n"
            + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, **(env or {})},
                          timeout=120)  # buffered streams, as by default


def test_exit_handlers_streams_and_code(tmp_path):
    mark = tmp_path / "handler-ran"
    r = _run(f"""
        atexit.register(lambda: open({str(mark)!r}, "w").write("x"))
        sys.stdout.write("no newline, still buffered")
        sys.stderr.write("err")
        end_process(3)
        """)
    assert r.returncode == 3
    assert r.stdout == "no newline, still buffered" and r.stderr == "err"
    assert mark.read_text() == "x"


def test_a_running_thread_is_waited_for(tmp_path):
    mark = tmp_path / "thread-done"
    r = _run(f"""
        def work():
            time.sleep(0.5)
            open({str(mark)!r}, "w").write("done")
        threading.Thread(target=work).start()
        end_process(0)
        """)
    assert r.returncode == 0 and mark.read_text() == "done"


def test_normal_exit_on_request_and_for_a_message():
    r = _run("end_process('usage: a message')")
    assert r.returncode == 1 and "usage: a message" in r.stderr
    r = _run("end_process(None)", env={"PYLANDSCAPE_FAST_EXIT": "0"})
    assert r.returncode == 0


def test_mds_entry_point_ends_cleanly(tmp_path):
    """The real command: exit code 0, every output written, the last line printed."""
    import numpy as np
    from safetensors.numpy import save_file
    snaps = tmp_path / "ckpts"
    snaps.mkdir()
    rng = np.random.default_rng(0)
    w = rng.standard_normal(50).astype(np.float32)
    for i in range(6):
        w = w + 0.1 * rng.standard_normal(50).astype(np.float32)
        save_file({"fc.weight": w.reshape(5, 10).copy()}, str(snaps / f"step{i}.safetensors"))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "pylandscape.mds", "--snapshots", str(snaps), "--out", str(out),
                        "--no-cache"], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"mds.csv", "mds.json", "mds.png"} <= {p.name for p in out.iterdir()}
    assert r.stderr.strip().splitlines()[-1].startswith("wrote ")  # the last line, flushed before the end
