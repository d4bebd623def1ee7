"""The three theory experiments on tiny configs: contract, files, figures, and the measured claims."""
import dataclasses
import json

import pytest
import torch

from pylandscape.experiments import activation_regions, feature_rank, minimum_dimension, outdir
from pylandscape.experiments.config import config_from_dict, config_to_dict

MODULES = (minimum_dimension, activation_regions, feature_rank)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("mod", MODULES)
def test_module_contract(mod):
    assert isinstance(mod.NAME, str) and mod.FIGURE and mod.DESCRIPTION.strip()
    assert {"paper", "quick"} <= set(mod.PRESETS)
    for preset in mod.PRESETS.values():
        assert isinstance(preset, mod.Config)
        d = config_to_dict(preset)
        assert config_from_dict(mod.Config, json.loads(json.dumps(d))) == preset  # JSON round trip
    assert "device" in {f.name for f in dataclasses.fields(mod.Config)}


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_minimum_dimension_tiny(tmp_path):
    cfg = dataclasses.replace(minimum_dimension.PRESETS["quick"], num_points=10, in_dim=3, widths=(1, 8),
                              activations=("relu",), lbfgs_steps=150, newton_steps=10, cnn_points=3,
                              cnn_widths=(0.0625,), cnn_lbfgs_steps=60, lanczos_steps=40)
    res = minimum_dimension.run(cfg, tmp_path)
    table = {r["case"]: r for r in outdir.read_table(tmp_path / "metrics" / "minimum_dimension")}
    big = table["fc2 relu w8"]  # 41 parameters, 10 equations
    assert big["final_loss"] < 1e-20
    assert big["dim_estimate"] == big["dim_predicted"] == 41 - 10
    assert big["hessian_nonzero"] == big["jacobian_rank"] == 10 and big["hessian_zero"] == 31
    small = table["fc2 relu w1"]  # 6 parameters for 10 equations: no zero-loss point
    assert small["final_loss"] > 1e-6 and small["dim_predicted"] == 0
    cnn = table["dcnn x0.0625"]
    assert cnn["num_equations"] == 30 and cnn["hessian_method"] == "lanczos"
    assert cnn["lanczos_top10_max_rel_err_vs_JJt"] < 1e-8  # Ritz values = eigenvalues of (2/N) J Jᵀ
    assert res["cases"] == 3
    assert (tmp_path / "figures" / "minimum_dimension.png").stat().st_size > 1000
    # plot() redraws from the saved files only; a second run() resumes without recomputing
    (tmp_path / "figures" / "minimum_dimension.png").unlink()
    assert [p.name for p in minimum_dimension.plot(tmp_path)] == ["minimum_dimension.png"]
    assert minimum_dimension.run(cfg, tmp_path) == res


def test_activation_regions_tiny_shows_the_transition(tmp_path):
    cfg = dataclasses.replace(activation_regions.PRESETS["quick"], n=12, series=("4:w", "1:wb:count"),
                              ratios=(0.5, 1.0, 4.0), num_regions=60)
    res = activation_regions.run(cfg, tmp_path)
    rows = outdir.read_table(tmp_path / "metrics" / "activation_regions")
    four = {r["width"]: r for r in rows if r["series"] == "4:w"}
    assert sorted(four) == [2, 3, 12]  # ceil(ratio·n / 4 columns per unit)
    assert four[2]["full_rank_fraction"] == 0.0 and four[2]["min_rank"] <= 8  # 8 columns < 12 points
    assert four[12]["ratio"] == 4.0 and four[12]["full_rank_fraction"] > 0.9
    assert all(r["width"] * 4 == r["columns"] for r in four.values())
    one = [r for r in rows if r["series"] == "1:wb:count"]
    assert {r["sampling"] for r in one} == {"count"} and all(r["columns"] == 2 * r["width"] for r in one)
    assert res["4:w: smallest columns/n with full-rank fraction >= 0.9"] == 4.0
    assert activation_regions.plot(tmp_path)[0].exists()


def test_activation_regions_rejects_bad_series(tmp_path):
    cfg = dataclasses.replace(activation_regions.PRESETS["quick"], series=("3:w:count",))
    with pytest.raises(ValueError, match="count"):
        activation_regions.run(cfg, tmp_path)


def test_feature_rank_tiny(tmp_path):
    cfg = dataclasses.replace(feature_rank.PRESETS["quick"], num_points=20, widths=(0.0625,),
                              activations=("relu",), train_steps=2)
    res = feature_rank.run(cfg, tmp_path)
    rows = outdir.read_table(tmp_path / "metrics" / "feature_rank")
    assert {r["stage"] for r in rows} == {"init", "trained"}
    assert res["N"] == 20
    for r in rows:
        assert r["rank"] <= min(r["N"], r["units"])
        if r["layer"] == "conv1":  # affine in the input: rank ≤ input rank + 1
            assert r["rank"] <= res["input_rank"] + 1
    wide_post = [r for r in rows if r["kind"] == "post" and r["units"] >= 20]
    assert wide_post and all(r["rank"] == 20 for r in wide_post)
    assert feature_rank.plot(tmp_path)[0].exists()
