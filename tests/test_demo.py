"""`python -m pylandscape demo --quick`: writes the report with its figures and numbers, prints its path."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from reference_mds import cosine_mds

from pylandscape.store import SnapshotStore

ROOT = Path(__file__).resolve().parents[1]
# Run `python -m pylandscape` away from the checkout, so it imports the installed package (with _C).
OUTSIDE_SOURCE = tempfile.gettempdir()


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_demo_quick_writes_report(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "pylandscape", "demo", "--quick", "--out", str(out), "--threads", "1"],
                       cwd=OUTSIDE_SOURCE, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r"^report: (.+)$", r.stdout, re.M)
    assert m, r.stdout
    report = Path(m.group(1))
    assert report == (out / "report.html").resolve() and report.exists()
    text = report.read_text()
    for needle in ("zero training error", "average of main and branch 1", "variance captured", "figures/mds_all.png"):
        assert needle in text
    for src in re.findall(r"<img src='([^']+)'", text):
        assert (out / src).stat().st_size > 1000
    assert len(re.findall(r"<img src=", text)) >= 5
    # the headline "variance captured" is that of classical MDS of 1 - cos of the embedded snapshots,
    # recomputed here independently in float64 from the stores the demo wrote
    res = json.loads((out / "results.json").read_text())
    emb = json.loads((out / "metrics" / "mds_all.json").read_text())
    runs = [m["run"] for m in emb["meta"]]
    stores = {SnapshotStore(p).entries[0]["run"]: SnapshotStore(p) for p in sorted((out / "stores").iterdir())
              if p.name != "averages"}
    avg = SnapshotStore(out / "stores" / "averages")
    flats = []
    for name in dict.fromkeys(r for r in runs if not r.startswith("average")):
        flats += [stores[name].load_flat(i, torch.float64) for i in range(len(stores[name]))]
    flats += [avg.load_flat(i, torch.float64) for i in range(len(avg))]
    assert len(flats) == len(runs)
    ref, captured = cosine_mds(torch.stack(flats).numpy())
    assert res["mds_captured"] == emb["captured"] == pytest.approx(captured, abs=1e-7)
    # the demo is the bgd-branches experiment: `plot` redraws it and rewrites the report
    (out / "report.html").unlink()
    r2 = subprocess.run([sys.executable, "-m", "pylandscape", "plot", str(out)], cwd=OUTSIDE_SOURCE, capture_output=True,
                        text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert (out / "report.html").exists()


def test_demo_help():
    r = subprocess.run([sys.executable, "-m", "pylandscape", "demo", "--help"], cwd=OUTSIDE_SOURCE, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout and "--out" in r.stdout
