"""The experiment runner's command line: listing, help, errors, config overrides and the output folder rules."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import pylandscape
from pylandscape import plot
from pylandscape.experiments import MODULES, bgd_branches, cli, load_all, outdir, perturb_retrain
from pylandscape.experiments.config import apply_overrides, config_from_dict, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
# Run `python -m pylandscape` away from the checkout, so it imports the installed package (with _C).
OUTSIDE_SOURCE = tempfile.gettempdir()


def test_list_names_every_module(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    mods = load_all()
    # every module file present in the package is registered and listed
    present = [m for m in MODULES if (ROOT / "pylandscape" / "experiments" / f"{m}.py").exists()]
    assert len(mods) == len(present)
    for name, mod in mods.items():
        assert name in out and mod.FIGURE in out
    for name in ("sgd-stages", "bgd-branches", "perturb-retrain", "agreement", "interpolate", "polynomial",
                 "overparam", "random-labels"):
        assert name in mods


@pytest.mark.parametrize("name", sorted(load_all()))
def test_help_explains_the_figure(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    mod = load_all()[name]
    assert mod.FIGURE in out and "--preset" in out and "--set" in out
    for f in dataclasses.fields(mod.PRESETS["quick"]):
        assert f.name in out


def test_unknown_experiment_is_one_line_error(capsys):
    assert cli.main(["no-such-thing"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown experiment 'no-such-thing'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("sets, msg", [
    (["nofield=1"], "unknown field 'nofield'"),
    (["epochs=abc"], "epochs: expected an integer"),
    (["epochs"], "field=value"),
])
def test_bad_set_is_one_line_error(tmp_path, capsys, sets, msg):
    argv = ["bgd-branches", "--out", str(tmp_path / "o")]
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_overrides_parse_types():
    c = apply_overrides(bgd_branches.PRESETS["quick"], ["branch_epochs=0,5", "branch_scale=0.5", "train_size=none",
                                                "lr=1e-3", "chunk-size=64", "mds_layer=2"])
    assert c.branch_epochs == (0, 5) and c.branch_scale == (0.5,) and c.train_size is None
    assert c.lr == 1e-3 and c.chunk_size == 64 and c.mds_layer == "2"
    with pytest.raises(ValueError, match="integer"):
        apply_overrides(bgd_branches.PRESETS["quick"], ["epochs=2.5"])
    assert apply_overrides(perturb_retrain.PRESETS["quick"], ["reference=false"]).reference is False


@pytest.mark.parametrize("name", sorted(load_all()))
def test_config_roundtrip(name):
    mod = load_all()[name]
    for cfg in mod.PRESETS.values():
        d = json.loads(json.dumps(config_to_dict(cfg)))
        assert config_from_dict(type(cfg), d) == cfg
    with pytest.raises(ValueError, match="unknown config field"):
        config_from_dict(type(cfg), {**config_to_dict(cfg), "bogus": 1})


def test_out_folder_rules(tmp_path):
    cfg = bgd_branches.PRESETS["quick"]
    out = tmp_path / "o"
    outdir.prepare_out(out, bgd_branches.NAME, cfg)
    outdir.Progress(out)  # the run started but finished nothing (e.g. the data set was missing): may start over
    outdir.prepare_out(out, bgd_branches.NAME, cfg)
    outdir.Progress(out).mark("main")
    with pytest.raises(ValueError, match="--resume"):
        outdir.prepare_out(out, bgd_branches.NAME, cfg)
    outdir.prepare_out(out, bgd_branches.NAME, cfg, resume=True)  # same settings: fine
    with pytest.raises(ValueError, match="epochs"):
        outdir.prepare_out(out, bgd_branches.NAME, dataclasses.replace(cfg, epochs=3), resume=True)
    with pytest.raises(ValueError, match="holds a 'bgd-branches' run"):
        outdir.prepare_out(out, "sgd-stages", cfg, resume=True)


def test_plot_refuses_non_run_folder(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert "not an experiment output folder" in capsys.readouterr().err


def test_module_entry_point_lists():
    r = subprocess.run([sys.executable, "-m", "pylandscape", "run", "--list"], capture_output=True, text=True,
                       cwd=OUTSIDE_SOURCE, timeout=120)
    assert r.returncode == 0 and "bgd-branches" in r.stdout


def test_importing_every_module_keeps_the_matplotlib_backend():
    """A notebook's backend survives `import pylandscape...` (no matplotlib.use at import)."""
    code = ("import importlib, pkgutil, matplotlib, pylandscape\n"
            "for m in pkgutil.walk_packages(pylandscape.__path__, 'pylandscape.'):\n"
            "    if not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "print(matplotlib.get_backend())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=OUTSIDE_SOURCE, timeout=120,
                       env={**os.environ, "MPLBACKEND": "svg"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().lower() == "svg"


def test_run_help_quotes_the_protocol_and_config_json_records_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bgd-branches", "--help"])
    text = capsys.readouterr().out
    for needle in ("preset paper:", "preset paper-sigma0.5:", "preset paper-fig16:", "follows: (issue 12)",
                   "choice: lr=0.1", "differs from paper in: branch_scale=[0.5]", "preset quick:"):
        assert needle in text, needle
    out = tmp_path / "b"
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # not 1, so that the check below can fail
    try:
        assert cli.main(["bgd-branches", "--out", str(out), "--set", "train_size=60", "--set", "width=0.0625",
                         "--set", "epochs=2", "--set", "branch_epochs=0", "--set", "threads=1"]) == 0
        assert torch.get_num_threads() == 2  # threads=1 held for the run, not for the caller after it
    finally:
        torch.set_num_threads(before)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["protocol"] == bgd_branches.PROTOCOLS["quick"].to_json()
    assert cfg["overrides"][0] == "train_size=60" and cfg["config"]["momentum"] == 0.0


def test_no_momentum_where_the_paper_says_sgd_or_gd():
    """Every preset of every experiment that trains with SGD/GD uses plain SGD/GD (issue 12)."""
    for mod in load_all().values():
        for name, cfg in mod.PRESETS.items():
            for field in ("momentum", "gd_momentum"):
                assert getattr(cfg, field, 0.0) == 0.0, (mod.NAME, name, field)


def _module_imports() -> dict[str, set[str]]:
    """pylandscape module -> the pylandscape modules it imports at module level (not inside functions)."""
    pkg_root = Path(pylandscape.__file__).resolve().parent
    mods = {}
    for path in pkg_root.rglob("*.py"):
        rel = path.relative_to(pkg_root.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_pkg else parts)
        mods[name] = (path, is_pkg)
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rsplit(".", 1)[0]
        edges = set()
        tree = ast.parse(path.read_text())
        nodes = list(tree.body)
        while nodes:  # module level, including try/if blocks, but no function or class bodies
            node = nodes.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue  # annotations only, never imported at run time
            if isinstance(node, (ast.Try, ast.If)):
                nodes += node.body + node.orelse + getattr(node, "finalbody", []) + \
                    [n for h in getattr(node, "handlers", []) for n in h.body]
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                if not base.startswith("pylandscape"):
                    continue
                for a in node.names:
                    target = f"{base}.{a.name}"
                    edges.add(target if target in mods else base)
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def test_no_import_cycles():
    graph = _module_imports()
    assert "pylandscape.plot" in graph and "pylandscape.experiments.outdir" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
