"""What an MDS run writes: mds.csv, mds.json, the figure (png/svg/pdf) and mds.html."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .. import embedding_plot
from ..store import META_FIELDS

if TYPE_CHECKING:  # the result type only; pipeline imports this module
    from .pipeline import MDSResult


def coord_names(k: int) -> list[str]:
    """x, y (k=2); x, y, z (k=3); x1..xk otherwise."""
    if k == 1:
        return ["x"]
    if k <= 3:
        return ["x", "y", "z"][:k]
    return [f"x{i + 1}" for i in range(k)]


def _meta_columns(meta: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for m in meta:
        for k in m:
            if k != "path":
                seen.setdefault(k, None)
    first = [c for c in META_FIELDS if c in seen]
    return first + sorted(c for c in seen if c not in first)


def write_csv(result: MDSResult, path: Path) -> Path:
    cn = coord_names(result.coords.shape[1])
    mc = _meta_columns(result.meta)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"] + cn + mc)
        for xy, m in zip(result.coords, result.meta):
            w.writerow([m.get("path", "")] + [repr(float(v)) for v in xy]
                       + ["" if m.get(c) is None else m.get(c) for c in mc])
    return path


def write_json(result: MDSResult, path: Path) -> Path:
    path.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return path


def write_outputs(result: MDSResult, out_dir, *, annotate: str = "epoch",
                  formats: Sequence[str] = ("png",), html: bool = True) -> dict:
    """Write mds.csv, mds.json, the figure in each format and mds.html into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result.files["csv"] = str(write_csv(result, out / "mds.csv"))
    for fmt in formats:
        p = out / f"mds.{fmt}"
        embedding_plot.plot_result(result, p, annotate=annotate)
        result.files[fmt] = str(p)
    if html:
        title = result.title or embedding_plot.title_for(result)
        result.files["html"] = str(embedding_plot.write_html(result.coords, result.meta, out / "mds.html",
                                                             title=title))
    result.files["json"] = str(out / "mds.json")
    write_json(result, out / "mds.json")
    return result.files


