"""surface.html: one self-contained file (inline data and script, no CDN, works offline).

2-D surfaces: a heat map (hover for the coordinates and every quantity at that grid point; the
trajectory and the given models drawn on top) and a 3-D mesh you turn by dragging; a selector
chooses the quantity. 1-D surfaces: the curves, with hover.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from ..store import atomic_write_bytes
from .surface import Surface, axis_names, primary_quantity

_SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const sel = document.getElementById('q'), logbox = document.getElementById('log');
D.quantities.forEach(q => { const o = document.createElement('option'); o.value = q; o.textContent = q; sel.appendChild(o); });
sel.value = D.primary;
const tip = document.getElementById('tip');
function viridis(t) {  // 5-stop approximation of matplotlib's viridis
  const s = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
  t = Math.min(1, Math.max(0, t)) * 4; const i = Math.min(3, Math.floor(t)), f = t - i;
  return 'rgb(' + s[i].map((c, k) => Math.round(c + f * (s[i + 1][k] - c))).join(',') + ')';
}
function scaled(q) {
  const v = D.values[q].flat(), uselog = logbox.checked && Math.min(...v) > 0;
  const tr = x => uselog ? Math.log(x) : x, lo = Math.min(...v.map(tr)), hi = Math.max(...v.map(tr));
  return x => hi > lo ? (tr(x) - lo) / (hi - lo) : 0.5;
}
function fmt(x) { return Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(3) : x.toPrecision(4); }
const heat = document.getElementById('heat'), hc = heat.getContext('2d');
const P = 50, W = heat.width - 2 * P, H = heat.height - 2 * P;
function gx(x) { return P + (x - D.xs[0]) / (D.xs[D.xs.length - 1] - D.xs[0]) * W; }
function gy(y) { return P + H - (y - D.ys[0]) / (D.ys[D.ys.length - 1] - D.ys[0]) * H; }
function drawHeat() {
  const q = sel.value, z = D.values[q], f = scaled(q), nx = D.xs.length, ny = D.ys.length;
  hc.clearRect(0, 0, heat.width, heat.height);
  const cw = W / nx, ch = H / ny;
  for (let j = 0; j < ny; j++) for (let i = 0; i < nx; i++) {
    hc.fillStyle = viridis(f(z[j][i])); hc.fillRect(P + i * cw, P + H - (j + 1) * ch, cw + 0.5, ch + 0.5);
  }
  if (D.trajectory) {
    hc.strokeStyle = 'black'; hc.lineWidth = 1.5; hc.beginPath();
    D.trajectory.forEach((p, k) => k ? hc.lineTo(gx(p[0]), gy(p[1])) : hc.moveTo(gx(p[0]), gy(p[1]))); hc.stroke();
    D.trajectory.forEach(p => { hc.fillStyle = 'white'; hc.beginPath(); hc.arc(gx(p[0]), gy(p[1]), 3, 0, 7); hc.fill(); hc.stroke(); });
  }
  Object.entries(D.anchors).forEach(([n, p]) => {
    hc.fillStyle = 'red'; hc.beginPath(); hc.arc(gx(p[0]), gy(p[1]), 6, 0, 7); hc.fill();
    hc.fillStyle = 'black'; hc.font = '13px sans-serif'; hc.fillText(n, gx(p[0]) + 8, gy(p[1]) - 8);
  });
  hc.fillStyle = 'black'; hc.font = '12px sans-serif';
  hc.fillText(D.xlabel, P, heat.height - 12); hc.save(); hc.translate(14, P + H); hc.rotate(-Math.PI / 2);
  hc.fillText(D.ylabel, 0, 0); hc.restore();
  [0, nx - 1].forEach(i => hc.fillText(fmt(D.xs[i]), P + i * cw, P + H + 14));
  [0, ny - 1].forEach(j => hc.fillText(fmt(D.ys[j]), 18, P + H - j * ch));
}
heat.onmousemove = e => {
  const r = heat.getBoundingClientRect(), nx = D.xs.length, ny = D.ys.length;
  const i = Math.floor((e.clientX - r.left - P) / (W / nx)), j = Math.floor((P + H - (e.clientY - r.top)) / (H / ny));
  if (i < 0 || j < 0 || i >= nx || j >= ny) { tip.style.display = 'none'; return; }
  tip.innerHTML = 'x = ' + fmt(D.xs[i]) + ', y = ' + fmt(D.ys[j]) + '<br>' +
    D.quantities.map(q => q + ': ' + fmt(D.values[q][j][i])).join('<br>');
  tip.style.left = (e.pageX + 12) + 'px'; tip.style.top = (e.pageY + 12) + 'px'; tip.style.display = 'block';
};
heat.onmouseleave = () => tip.style.display = 'none';
const mesh = document.getElementById('mesh'), mc = mesh.getContext('2d');
let az = -0.9, el = 0.6, drag = null;
function drawMesh() {
  const q = sel.value, z = D.values[q], f = scaled(q), nx = D.xs.length, ny = D.ys.length;
  const ca = Math.cos(az), sa = Math.sin(az), ce = Math.cos(el), se = Math.sin(el), S = mesh.width * 0.32;
  const pr = (i, j) => { const x = 2 * i / (nx - 1) - 1, y = 2 * j / (ny - 1) - 1, h = 1.4 * f(z[j][i]) - 0.7;
    const X = ca * x - sa * y, Y = sa * x + ca * y; return [mesh.width / 2 + S * X, mesh.height / 2 - S * (ce * h - se * Y), se * h + ce * Y]; };
  mc.clearRect(0, 0, mesh.width, mesh.height);
  const quads = [];
  for (let j = 0; j < ny - 1; j++) for (let i = 0; i < nx - 1; i++) {
    const p = [pr(i, j), pr(i + 1, j), pr(i + 1, j + 1), pr(i, j + 1)];
    quads.push([p.reduce((a, b) => a + b[2], 0), p, f((z[j][i] + z[j + 1][i + 1]) / 2)]);
  }
  quads.sort((a, b) => a[0] - b[0]);
  quads.forEach(([_, p, c]) => { mc.fillStyle = viridis(c); mc.strokeStyle = 'rgba(0,0,0,0.15)'; mc.beginPath();
    p.forEach((v, k) => k ? mc.lineTo(v[0], v[1]) : mc.moveTo(v[0], v[1])); mc.closePath(); mc.fill(); mc.stroke(); });
}
mesh.onmousedown = e => drag = [e.clientX, e.clientY, az, el];
window.onmouseup = () => drag = null;
window.onmousemove = e => { if (!drag) return; az = drag[2] + (e.clientX - drag[0]) / 150;
  el = Math.max(-1.5, Math.min(1.5, drag[3] + (e.clientY - drag[1]) / 150)); drawMesh(); };
const curve = document.getElementById('curve'), cc = curve.getContext('2d');
function drawCurve() {
  const q = sel.value, z = D.values[q], f = scaled(q), n = D.xs.length;
  cc.clearRect(0, 0, curve.width, curve.height); cc.strokeStyle = '#1f77b4'; cc.lineWidth = 2; cc.beginPath();
  for (let i = 0; i < n; i++) { const x = P + i / (n - 1) * (curve.width - 2 * P), y = curve.height - P - f(z[i]) * (curve.height - 2 * P);
    i ? cc.lineTo(x, y) : cc.moveTo(x, y); }
  cc.stroke(); cc.fillStyle = 'black'; cc.font = '12px sans-serif'; cc.fillText(D.xlabel, P, curve.height - 12);
}
curve.onmousemove = e => {
  const r = curve.getBoundingClientRect(), n = D.xs.length;
  const i = Math.round((e.clientX - r.left - P) / (curve.width - 2 * P) * (n - 1));
  if (i < 0 || i >= n) { tip.style.display = 'none'; return; }
  tip.innerHTML = 'x = ' + fmt(D.xs[i]) + '<br>' + D.quantities.map(q => q + ': ' + fmt(D.values[q][i])).join('<br>');
  tip.style.left = (e.pageX + 12) + 'px'; tip.style.top = (e.pageY + 12) + 'px'; tip.style.display = 'block';
};
function draw() { if (D.ys) { drawHeat(); drawMesh(); } else { drawCurve(); } }
sel.onchange = draw; logbox.onchange = draw;
document.getElementById(D.ys ? 'two' : 'one').style.display = 'block';
draw();
"""


def write_html(s: Surface, path: str | Path, *, title: str = "Loss surface") -> Path:
    """Write the interactive view of `s` to path (atomically) and return the path."""
    path = Path(path)
    names = axis_names(s)
    data = {
        "xs": np.asarray(s.xs, float).tolist(), "ys": None if s.ys is None else np.asarray(s.ys, float).tolist(),
        "values": {q: np.asarray(v, float).tolist() for q, v in s.values.items()},
        "quantities": s.quantities(), "primary": primary_quantity(s),
        "trajectory": None if s.trajectory is None or s.trajectory.shape[1] < 2 else np.asarray(s.trajectory, float).tolist(),
        "anchors": s.anchors if s.ys is not None else {}, "xlabel": names[0], "ylabel": names[1] if len(names) > 1 else "",
    }
    bn = html.escape(str(s.info.get("bn_description", s.info.get("bn", ""))))
    sizes = html.escape(", ".join(f"{k}: {v} images" for k, v in s.info.get("set_sizes", {}).items()))
    # "</" cannot end the JSON island early: escape it
    blob = json.dumps(data, allow_nan=True).replace("</", "<\\/").replace("NaN", "null").replace("Infinity", "1e308")
    doc = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:16px}} canvas{{border:1px solid #ccc;margin:4px}}
#tip{{position:absolute;display:none;background:#fff;border:1px solid #888;padding:6px;font-size:12px;pointer-events:none}}
.panel{{display:none}}</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{bn}; {sizes}. Quantity: <select id="q"></select> <label><input type="checkbox" id="log" checked> log colour scale</label></p>
<div id="two" class="panel"><canvas id="heat" width="620" height="560"></canvas>
<canvas id="mesh" width="560" height="560" title="drag to turn"></canvas>
<p>Left: hover a cell for every quantity there; black line: the trajectory projected onto the plane; red: the origin or the given models. Right: drag to turn.</p></div>
<div id="one" class="panel"><canvas id="curve" width="800" height="420"></canvas></div>
<div id="tip"></div>
<script type="application/json" id="data">{blob}</script>
<script>{_SCRIPT}</script></body></html>
"""
    atomic_write_bytes(path, doc.encode())
    return path
