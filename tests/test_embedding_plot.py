"""The MDS figure's legend goes to a corner without points (our own choice, not matplotlib's slow loc="best")."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from pylandscape import embedding_plot


def _points(empty: str, n: int = 600, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
    """4 trajectories filling a 1.3 x 1 box except the corner `empty` (0.45 of each side)."""
    rng = np.random.default_rng(seed)
    xy = rng.random((4 * n, 2))
    right, top = "right" in empty, "upper" in empty
    inside = ((xy[:, 0] > 0.55) if right else (xy[:, 0] < 0.45)) & ((xy[:, 1] > 0.55) if top else (xy[:, 1] < 0.45))
    xy = xy[~inside][:n] * [1.3, 1.0]  # wider than tall, like the axes: no empty margin beside the points
    meta = [{"trajectory": f"run{i % 4}", "step": i // 4, "path": f"f{i}"} for i in range(len(xy))]
    return xy, meta


@pytest.mark.parametrize("empty", ["upper right", "upper left", "lower left", "lower right"])
def test_legend_covers_no_point(tmp_path, empty):
    xy, meta = _points(empty)
    fig = embedding_plot.plot_embedding(xy, meta, annotate="none", path=tmp_path / "f.png")
    ax = fig.axes[0]
    box = ax.get_legend().get_window_extent()  # display coordinates, after savefig's draw
    disp = ax.transData.transform(xy)
    covered = (disp[:, 0] >= box.x0) & (disp[:, 0] <= box.x1) & (disp[:, 1] >= box.y0) & (disp[:, 1] <= box.y1)
    assert not covered.any(), f"{empty}: the legend covers {int(covered.sum())} points"


def test_emptiest_corner_ties_and_counts():
    from matplotlib.figure import Figure
    ax = Figure().subplots()
    x = np.array([0.0, 1.0])
    y = np.array([0.0, 1.0])
    ax.plot(x, y)
    # the points sit in the lower-left and upper-right corners: upper left wins the tie with lower right
    assert embedding_plot.emptiest_corner(ax, x, y, ["a", "b"], None) == "upper left"
    x2 = np.concatenate([x, [0.0]])
    y2 = np.concatenate([y, [1.0]])
    assert embedding_plot.emptiest_corner(ax, x2, y2, ["a", "b"], None) == "lower right"


def test_background_import_restores_the_switch_interval():
    """The short switch interval lasts while matplotlib loads, not beyond (it is process-wide)."""
    before = sys.getswitchinterval()
    th = embedding_plot.import_in_background()
    during = sys.getswitchinterval()
    th.join()
    assert sys.getswitchinterval() == before
    assert during == pytest.approx(min(before, embedding_plot.SWITCH_INTERVAL), rel=0.01) or during == before
