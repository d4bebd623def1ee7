"""A surface on disk: surface.npz (arrays), surface.csv (one row per grid point), surface.json (how it
was made), written atomically; `read_surface` loads them back for `python -m pylandscape plot`."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ..store import atomic_write_bytes, atomic_write_json
from .surface import Surface

NPZ, CSV, JSON = "surface.npz", "surface.csv", "surface.json"


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def write_data(surface: Surface, out_dir: str | Path) -> list[Path]:
    """surface.npz, surface.csv, surface.json in out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"xs": surface.xs, "values_names": np.array(surface.quantities())}
    if surface.ys is not None:
        arrays["ys"] = surface.ys
    for q, v in surface.values.items():
        arrays[q] = v
    if surface.trajectory is not None:
        arrays["trajectory"] = surface.trajectory
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out / NPZ, buf.getvalue())

    text = io.StringIO()
    w = csv.writer(text)
    qs = surface.quantities()
    if surface.ys is None:
        w.writerow(["x"] + qs)
        for i, x in enumerate(surface.xs):
            w.writerow([repr(float(x))] + [repr(float(surface.values[q][i])) for q in qs])
    else:
        w.writerow(["x", "y"] + qs)
        for iy, y in enumerate(surface.ys):
            for ix, x in enumerate(surface.xs):
                w.writerow([repr(float(x)), repr(float(y))] + [repr(float(surface.values[q][iy, ix])) for q in qs])
    atomic_write_bytes(out / CSV, text.getvalue().encode())

    meta = {"kind": surface.kind, "dims": surface.dims, "grid": [len(surface.xs)] +
            ([len(surface.ys)] if surface.ys is not None else []), "quantities": qs,
            "anchors": surface.anchors, "info": surface.info,
            "trajectory_meta": surface.trajectory_meta}
    atomic_write_json(out / JSON, _plain(meta))
    return [out / NPZ, out / CSV, out / JSON]


def read_surface(out_dir: str | Path) -> Surface:
    """The Surface saved in out_dir (no pickles: np.load(allow_pickle=False))."""
    out = Path(out_dir)
    for name in (NPZ, JSON):
        if not (out / name).exists():
            raise FileNotFoundError(f"{out / name} not found: {out} is not a surface output folder")
    meta = json.loads((out / JSON).read_text())
    with np.load(out / NPZ, allow_pickle=False) as z:
        xs = z["xs"]
        ys = z["ys"] if "ys" in z.files else None
        values = {q: z[q] for q in meta["quantities"]}
        traj = z["trajectory"] if "trajectory" in z.files else None
    return Surface(xs, ys, values, meta["kind"], meta.get("info", {}), traj, meta.get("trajectory_meta"),
                   meta.get("anchors", {}))


def is_surface_dir(path: str | Path) -> bool:
    return (Path(path) / JSON).exists() and (Path(path) / NPZ).exists()
