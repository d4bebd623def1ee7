"""Safetensors rows mapped side by side (snapshots/mapped.py): the same floats as a copy, the same MDS, and a
copy whenever the files do not share one float32 layout. Files written by safetensors' own save_file."""
from __future__ import annotations

import gc
import itertools
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pylandscape import mds
from pylandscape.snapshots import SnapshotError, discover, mapped

pytestmark = pytest.mark.skipif(not mapped.enabled(), reason="mapping needs Linux on x86-64 or arm64")


def _sd(g: torch.Generator) -> dict[str, torch.Tensor]:
    # the I64 counter is stored first (safetensors sorts by alignment), the running statistics sit between
    # bn.bias and bn.weight: the wanted tensors fall into two runs of adjacent columns
    return {"conv.weight": torch.randn(6, 3, 3, 3, generator=g), "conv.bias": torch.randn(6, generator=g),
            "bn.weight": torch.rand(6, generator=g), "bn.bias": torch.randn(6, generator=g),
            "bn.running_mean": torch.randn(6, generator=g), "bn.running_var": torch.rand(6, generator=g),
            "bn.num_batches_tracked": torch.tensor(5), "fc.weight": torch.randn(3, 54, generator=g),
            "fc.bias": torch.randn(3, generator=g)}


def _folder(root, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = _sd(g)
    for i in range(n):
        d = root / f"run{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: (v + 0.05 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
                   for k, v in base.items()}, d / f"step_{i:03d}.safetensors")
    return root


def test_mapped_rows_are_the_files_floats(tmp_path):
    sset = discover(_folder(tmp_path / "ck"))
    names = sset.spec.names
    assert "bn.running_mean" not in names and "bn.num_batches_tracked" not in names
    rows = list(range(len(sset)))
    for want in (list(range(len(names))), [names.index("fc.weight"), names.index("bn.bias")]):
        m = mapped.map_rows([sset.items[r] for r in rows], names, want)
        assert m is not None and sorted(m.columns) == sorted(want)
        assert m.X.shape[0] == len(rows) and m.X.stride(1) == 1 and m.X.stride(0) % 1024 == 0
        for t in want:
            a, b = m.columns[t]
            ref = sset.read_block(rows, [(t, 0, sset.spec.sizes[t])])
            assert np.array_equal(m.X[:, a:b].numpy(), ref), names[t]
        runs = m.runs()
        assert sorted(t for r in runs for t in r) == sorted(want)
        for r in runs:  # each run is adjacent columns; runs are not
            assert all(m.columns[x][1] == m.columns[y][0] for x, y in itertools.pairwise(r))
        for r, s in itertools.pairwise(runs):
            assert m.columns[r[-1]][1] != m.columns[s[0]][0]
    all_runs = mapped.map_rows(sset.items, names, list(range(len(names)))).runs()
    assert len(all_runs) == 2  # the running statistics split bn.bias from bn.weight


def test_mapped_embed_matches_the_copy(tmp_path, monkeypatch):
    root = _folder(tmp_path / "ck", n=12)
    for layer in (None, "fc.*", "bn.*"):
        a = mds.embed(root, layer=layer, cache=False, progress=False)
        monkeypatch.setenv("PYLANDSCAPE_MAP_FILES", "0")
        b = mds.embed(root, layer=layer, cache=False, progress=False)
        monkeypatch.delenv("PYLANDSCAPE_MAP_FILES")
        assert a.timings["read_mode"] == "mapped" and b.timings["read_mode"] == "copied"
        assert np.array_equal(a.coords, b.coords) and np.array_equal(a.eigenvalues, b.eigenvalues), layer
    # with the cache on every tensor is computed (one mapping), and a later run hits the cache
    c = mds.embed(root, layer="fc.*", progress=False, cache_dir=tmp_path / "cache")
    d = mds.embed(root, layer="fc.*", progress=False, cache_dir=tmp_path / "cache")
    assert c.timings["read_mode"] == "mapped" and d.timings["cache"] == "hit"
    np.testing.assert_array_equal(c.coords, d.coords)


def test_copy_when_layouts_differ(tmp_path):
    root = _folder(tmp_path / "ck", n=6)
    f = root / "run0" / "step_002.safetensors"
    from safetensors.torch import load_file
    save_file(load_file(f), f, metadata={"note": "another header length"})
    sset = discover(root)
    assert mapped.layout(sset.items, sset.spec.names, range(len(sset.spec))) is None
    res = mds.embed(root, cache=False, progress=False)
    assert res.timings["read_mode"] == "copied"
    # a half-precision tensor: not float32 columns
    root2 = _folder(tmp_path / "ck2", n=4)
    for p in sorted(root2.rglob("*.safetensors")):
        sd = load_file(p)
        sd["fc.bias"] = sd["fc.bias"].half()
        save_file(sd, p)
    s2 = discover(root2)
    assert mapped.layout(s2.items, s2.spec.names, [s2.spec.names.index("fc.bias")]) is None
    assert mapped.layout(s2.items, s2.spec.names, [s2.spec.names.index("fc.weight")]) is not None


def test_nan_in_a_mapped_file_names_it(tmp_path):
    root = _folder(tmp_path / "ck", n=6)
    from safetensors.torch import load_file
    f = root / "run1" / "step_003.safetensors"
    sd = load_file(f)
    sd["conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, f)
    with pytest.raises(SnapshotError, match=r"run1/step_003\.safetensors: tensor 'conv\.weight' has NaN"):
        mds.embed(root, cache=False, progress=False)
    with pytest.warns(UserWarning, match=r"step_003\.safetensors"):
        res = mds.embed(root, cache=False, progress=False, skip_bad=True)
    assert res.n == 5


def test_changed_after_discovery_is_copied(tmp_path, monkeypatch):
    """A file shorter now than its header said, one gone, or too many files for vm.max_map_count: no
    mapping (a short file would raise SIGBUS), and the copy names the bad file."""
    root = _folder(tmp_path / "ck", n=4)
    sset = discover(root)
    want = list(range(len(sset.spec)))
    assert mapped.map_rows(sset.items, sset.spec.names, want) is not None
    monkeypatch.setattr(mapped, "_max_map_count", lambda: 4100)
    assert mapped.map_rows(sset.items, sset.spec.names, want) is None
    monkeypatch.undo()
    f = sset.items[2].path
    f.write_bytes(f.read_bytes()[:-100])
    assert mapped.map_rows(sset.items, sset.spec.names, want) is None
    with pytest.raises(SnapshotError, match=rf"{f.name}: truncated"):
        mds.embed(sset, cache=False, progress=False)
    f.unlink()
    assert mapped.map_rows(sset.items, sset.spec.names, want) is None
    with pytest.raises(SnapshotError, match=rf"{f.name}: cannot open"):
        mds.embed(sset, cache=False, progress=False)


def _maps_mention(path) -> bool:
    with open("/proc/self/maps") as fh:
        return str(path) in fh.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_mapping_is_private_and_released(tmp_path):
    root = _folder(tmp_path / "ck", n=3)
    sset = discover(root)
    f = sset.items[0].path
    before = f.read_bytes()
    m = mapped.map_rows(sset.items, sset.spec.names, list(range(len(sset.spec))))
    assert _maps_mention(f)
    m.X[0, 0] = 123.0  # a stray write copies the page: the file is untouched
    assert f.read_bytes() == before
    view = m.X[1:, 2:5]
    del m
    gc.collect()
    assert _maps_mention(f)  # a view still holds the mapping
    del view
    gc.collect()
    assert not _maps_mention(f)
