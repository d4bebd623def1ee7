"""Every experiment's quick preset shrunk to seconds: output structure and the invariants the paper's
figures rest on (averages are exact averages, interpolation endpoints are the models, agreement
diagonals are 1, stages restart from the previous stage's end, resuming a finished run is a no-op,
`plot` redraws from saved files)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reference_mds import assert_same_embedding, cosine_mds

from pylandscape import plot
from pylandscape.experiments import bgd_branches, cli, outdir, perturb_retrain, polynomial, training, weights
from pylandscape.experiments.agreement import agreement_matrices
from pylandscape.experiments.config import apply_overrides
from pylandscape.store import SnapshotStore

TINY_DATA = ["--set", "train_size=60", "--set", "width=0.0625", "--set", "threads=1"]


def _standardised_noise(d: torch.Tensor, base: torch.Tensor, spec, scale) -> torch.Tensor:
    """d [P] / (scale_l x population std of base's tensor l), tensor by tensor, concatenated."""
    o = spec.offsets.tolist()
    scales = torch.as_tensor(scale, dtype=torch.float64).expand(len(o) - 1)
    return torch.cat([d[a:b] / (s * base[a:b].std(unbiased=False)) for a, b, s in zip(o[:-1], o[1:], scales)])


def _run(name: str, out: Path, *sets: str) -> None:
    argv = [name, "--preset", "quick", "--out", str(out)] + TINY_DATA
    for s in sets:
        argv += ["--set", s]
    assert cli.main(argv) == 0


def _snapshot_state(out: Path) -> dict:
    """Everything a re-run could change: manifests and tables (by content), progress."""
    state = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and (p.name == "manifest.jsonl" or p.suffix == ".csv" or p.name == "progress.json"):
            state[str(p.relative_to(out))] = p.read_bytes()
    return state


def _check_redraw(out: Path) -> None:
    before = sorted(p.relative_to(out) for p in out.rglob("figures/*.png"))
    for d in list(out.rglob("figures")):
        shutil.rmtree(d)
    assert plot.main([str(out)]) == 0
    pngs = list(out.rglob("figures/*.png"))
    assert sorted(p.relative_to(out) for p in pngs) == before
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


# ------------------------------------------------------------------------------------- bgd-branches
@pytest.fixture(scope="module")
def bgd(tmp_path_factory):
    out = tmp_path_factory.mktemp("bgd")
    _run("bgd-branches", out, "epochs=4", "branch_epochs=0,2", "branch_scale=0.5", "snapshot_every=1")
    return out


def test_bgd_outputs_and_exact_averages(bgd):
    for f in ("config.json", "progress.json", "results.json", "metrics/main.csv", "metrics/averages.csv",
              "metrics/mds_all.json", "figures/mds_all.png", "figures/mds_branch1.png", "figures/curves.png"):
        assert (bgd / f).exists(), f
    main = SnapshotStore(outdir.store_dir(bgd, "main"))
    assert sorted(int(e["epoch"]) for e in main.entries) == [0, 1, 2, 3, 4]
    avg = SnapshotStore(outdir.store_dir(bgd, "averages"))
    rows = outdir.read_table(bgd / "metrics" / "averages")
    assert len(avg) == len(rows) == 5 + 3  # branch 0: epochs 0..4, branch 1: epochs 2..4
    for i, e in enumerate(avg.entries):
        b, t = e["branch"], e["epoch"]
        br = SnapshotStore(outdir.store_dir(bgd, f"branch{b}"))
        j = [k for k, m in enumerate(br.entries) if int(m["epoch"]) + int(m["start_epoch"]) == t][0]
        m = main.select(epoch=t)[0]
        expect = (0.5 * (main.load_flat(m, torch.float64) + br.load_flat(j, torch.float64)))
        torch.testing.assert_close(avg.load_flat(i, torch.float64), expect, rtol=0, atol=1e-6)
    # the branches start from perturbed copies of the main model at their epoch: noise N(0, (0.5 s_l)^2)
    # per layer l, s_l = the layer's std. Standardised, all P entries are N(0, 1) draws.
    b1 = SnapshotStore(outdir.store_dir(bgd, "branch1"))
    start = b1.load_flat(b1.select(epoch=0)[0], torch.float64)
    base = main.load_flat(main.select(epoch=2)[0], torch.float64)
    cfg = outdir.load_config(bgd, bgd_branches.Config)
    spec = b1.spec
    frozen = ["conv1.bias", "conv2.bias", "conv3.bias", "conv4.bias"]  # BatchNorm cancels them
    scales = weights.tensor_scales(spec, 0.5, frozen)
    assert torch.equal(start.float(), weights.perturb(base.float(), spec.offsets, scales, mode="std",
                                                      seed=bgd_branches.branch_seed(cfg, 1)))
    o = spec.offsets.tolist()
    for i, n in enumerate(spec.names):
        same = torch.equal(start[o[i]:o[i + 1]], base[o[i]:o[i + 1]])
        assert same == (n in frozen), n  # the pre-BatchNorm biases, and only they, are left alone
    keep = torch.cat([torch.arange(o[i], o[i + 1]) for i, n in enumerate(spec.names) if n not in frozen])
    z = _standardised_noise(start - base, base, spec, scales)[keep]
    assert abs(float(z.mean())) < 4 / z.numel() ** 0.5  # 4 sigma (the seed is fixed: deterministic)
    assert abs(float((z ** 2).mean()) - 1) < 4 * (2 / z.numel()) ** 0.5
    # the MDS is classical MDS of 1 - cos of the paper's layer 2 (conv1's weight, not its frozen bias)
    # of every snapshot: same coordinates and captured share as an independent float64 computation
    emb = json.loads((bgd / "metrics" / "mds_all.json").read_text())
    flats, runs = [], []
    for name in ("main", "branch0", "branch1", "averages"):
        st = SnapshotStore(outdir.store_dir(bgd, name))
        flats += [st.load_flat(i, torch.float64) for i in range(len(st))]
        runs += [e["run"] for e in st.entries]
    assert [m["run"] for m in emb["meta"]] == runs
    w1 = spec.names.index("conv1.weight")
    ref, captured = cosine_mds(torch.stack(flats)[:, o[w1]:o[w1 + 1]].numpy())
    assert emb["captured"] == pytest.approx(captured, abs=1e-9)
    assert_same_embedding(emb["coords"], ref, atol=1e-6 * float(abs(ref).max()))
    # the paper's labels: training error, "NaN" at the random initialisation
    labels = [bgd_branches.point_label(m) for m in emb["meta"]]
    assert all((lab == "NaN") == (int(m["epoch"]) == 0) for lab, m in zip(labels, emb["meta"]))
    assert labels[runs.index("main") + 1] == f"{emb['meta'][runs.index('main') + 1]['train_error']:.2f}"
    res = json.loads((bgd / "results.json").read_text())
    assert "average0_final_train_error" in res and "mds_captured" in res


def test_bgd_resume_is_a_no_op(bgd):
    before = _snapshot_state(bgd)
    assert cli.main(["bgd-branches", "--out", str(bgd), "--resume"] + TINY_DATA +
                    ["--set", "epochs=4", "--set", "branch_epochs=0,2", "--set", "branch_scale=0.5",
                     "--set", "snapshot_every=1"]) == 0
    assert _snapshot_state(bgd) == before


def test_bgd_rerun_without_resume_refused(bgd, capsys):
    assert cli.main(["bgd-branches", "--out", str(bgd)] + TINY_DATA +
                    ["--set", "epochs=4", "--set", "branch_epochs=0,2", "--set", "branch_scale=0.5",
                     "--set", "snapshot_every=1"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bgd_plot_redraws(bgd):
    _check_redraw(bgd)


def test_bgd_interrupted_unit_is_redone(tmp_path):
    """A run killed after the main trajectory resumes with the branches, not from scratch."""
    cfg = apply_overrides(bgd_branches.PRESETS["quick"], ["train_size=60", "width=0.0625", "epochs=2",
                                                 "branch_epochs=0", "snapshot_every=1", "threads=1"])
    out = tmp_path / "o"
    outdir.prepare_out(out, bgd_branches.NAME, cfg)
    calls = []
    real = training.evaluate_flats

    def boom(*a, **k):
        calls.append(1)
        raise KeyboardInterrupt  # killed while averaging
    training.evaluate_flats = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            bgd_branches.run(cfg, out)
    finally:
        training.evaluate_flats = real
    prog = json.loads((out / "progress.json").read_text())
    assert set(prog) == {"main", "branch0"}
    main_manifest = (outdir.store_dir(out, "main") / "manifest.jsonl").read_bytes()
    bgd_branches.run(cfg, out)
    assert (outdir.store_dir(out, "main") / "manifest.jsonl").read_bytes() == main_manifest
    assert set(json.loads((out / "progress.json").read_text())) == {"main", "branch0", "averages", "mds"}


# ------------------------------------------------------------------- perturb-retrain, agreement, interpolate
PR_SETS = ("sgd_epochs=2", "source_epochs=1", "gd_epochs=2", "gd_max_epochs=5", "retrain_epochs=2",
           "n_perturb=2", "snapshot_every=1", "mds_layers=2")


@pytest.fixture(scope="module")
def pr(tmp_path_factory):
    out = tmp_path_factory.mktemp("pr")
    _run("perturb-retrain", out, *PR_SETS)
    return out


def test_perturb_retrain_outputs(pr):
    for src in ("sgd1", "final"):
        st = SnapshotStore(outdir.store_dir(pr, f"retrain_{src}"))
        assert sorted({e["perturbation"] for e in st.entries}) == [1, 2]
        starts = [st.load_flat(st.select(perturbation=k, epoch=0)[0]) for k in (1, 2)]
        assert not torch.equal(starts[0], starts[1])  # different noise per copy
        assert (pr / "metrics" / f"mds_{src}_layer2.json").exists()
        assert (pr / "figures" / f"retrain_{src}.png").exists()
    # the perturbation is added to the source model: its size follows sigma = 0.1 x layer std
    cfg = outdir.load_config(pr, perturb_retrain.Config)
    src = perturb_retrain.source_model(pr, cfg, "final")
    st = SnapshotStore(outdir.store_dir(pr, "retrain_final"))
    start = st.load_flat(st.select(perturbation=1, epoch=0)[0])
    frozen = ["conv1.bias", "conv2.bias", "conv3.bias", "conv4.bias"]  # BatchNorm cancels them
    scales = weights.tensor_scales(st.spec, 0.1, frozen)
    assert torch.equal(start, weights.perturb(src, st.spec.offsets, scales, mode="std",
                                              seed=perturb_retrain.perturbation_seed(cfg, perturb_retrain.sources(cfg).index("final"), 0)))
    o = st.spec.offsets.tolist()
    keep = torch.cat([torch.arange(o[i], o[i + 1]) for i, n in enumerate(st.spec.names) if n not in frozen])
    z = _standardised_noise(start.double() - src.double(), src.double(), st.spec, scales)[keep]
    assert abs(float(z.mean())) < 4 / z.numel() ** 0.5  # 4 sigma (the seed is fixed: deterministic)
    assert abs(float((z ** 2).mean()) - 1) < 4 * (2 / z.numel()) ** 0.5
    assert SnapshotStore.is_store(outdir.store_dir(pr, "reference_gd"))
    # the zero-error rule: GD runs gd_epochs, then on (one epoch at a time here) until the training error
    # is zero or gd_max_epochs is reached; the 'final' model is where it stopped
    gd = outdir.read_table(pr / "metrics" / "base_gd")
    errs = {r["epoch"] - cfg.sgd_epochs: r["train_error"] for r in gd}
    stop = max(errs)
    zero = [e for e in sorted(errs) if errs[e] == 0]
    assert stop == (max(cfg.gd_epochs, zero[0]) if zero else cfg.gd_max_epochs)
    assert all(errs[e] > 0 for e in errs if cfg.gd_epochs <= e < stop)
    res = json.loads((pr / "results.json").read_text())
    assert res["base_gd_epochs_run"] == stop and res["final_model_has_zero_train_error"] == (errs[stop] == 0)
    gd_store = SnapshotStore(outdir.store_dir(pr, "base_gd"))
    assert torch.equal(src, gd_store.load_flat(gd_store.select(epoch=stop)[0]))


def test_agreement_matrices_math():
    c = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pr_, pw = agreement_matrices(c)
    assert pr_[0, 1] == 0.5 and pr_[1, 0] == 0.5 and pr_[0, 2] == 1.0 and pr_[2, 0] == 0.5
    assert pw[0, 1] == 0.5 and torch.isnan(pw[2]).all()  # model 2 is never wrong
    assert torch.equal(torch.diagonal(pr_), torch.ones(3, dtype=torch.float64))


def test_agreement_from_perturb_retrain(pr, tmp_path):
    out = tmp_path / "ag"
    assert cli.main(["agreement", "--out", str(out), "--set", f"source_dir={pr}"]) == 0
    for src in ("sgd1", "final"):
        rec = json.loads((out / "metrics" / f"agreement_{src}_matrices.json").read_text())
        assert len(rec["labels"]) == 3 and rec["labels"][-1].startswith("reference")
        for key in ("p_right_given_right", "p_wrong_given_wrong"):
            m = torch.tensor(rec[key], dtype=torch.float64)
            d = torch.diagonal(m)
            assert torch.all((d == 1) | torch.isnan(d))
            assert torch.all((m[~torch.isnan(m)] >= 0) & (m[~torch.isnan(m)] <= 1))
        assert (out / "figures" / f"agreement_{src}.png").exists()
    _check_redraw(out)


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_interpolate_endpoints_are_the_models(pr, tmp_path):
    out = tmp_path / "ip"
    assert cli.main(["interpolate", "--out", str(out), "--set", f"source_dir={pr}",
                     "--set", "alpha_min=-0.5", "--set", "alpha_max=1.5", "--set", "alpha_step=0.25"]) == 0
    cfg = outdir.load_config(pr, perturb_retrain.Config)
    data = training.load_data(cfg)
    make = training.model_fn(cfg, data)
    st = SnapshotStore(outdir.store_dir(pr, "retrain_final"))
    rows = outdir.read_table(out / "metrics" / "interpolate_final")
    alphas = sorted({r["alpha"] for r in rows})
    assert alphas[0] == -0.5 and alphas[-1] == 1.5 and 0.0 in alphas and 1.0 in alphas and len(alphas) == 9
    for when, pick in (("before", min), ("after", max)):
        ends = []
        for k in (1, 2):
            idx = st.select(perturbation=k)
            ends.append(st.load_flat(pick(idx, key=lambda i: int(st.entries[i]["epoch"]))))
        ev = training.evaluate_flats(make, torch.stack(ends), data)
        for a, k in ((0.0, 0), (1.0, 1)):
            r = [r for r in rows if r["when"] == when and r["alpha"] == a][0]
            assert r["train_error"] == pytest.approx(ev["train_error"][k], abs=1e-9)
            assert r["test_loss"] == pytest.approx(ev["test_loss"][k], rel=1e-5)
    _check_redraw(out)


# ------------------------------------------------------------------------- sgd-stages, random-labels
@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages")
    _run("sgd-stages", out, "stages=3", "trajectories=3", "unperturbed=2", "epochs_per_stage=1",
         "late_from_stage=2", "batch_size=30")
    return out


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_stage_starts_are_previous_stage_ends(stages):
    for s in (1, 2, 3):
        st = SnapshotStore(outdir.store_dir(stages, f"stage_{s:02d}"))
        starts = {e["trajectory"]: st.load_flat(i) for i, e in enumerate(st.entries) if int(e["epoch"]) == 0}
        assert sorted(starts) == [1, 2, 3]
        assert torch.equal(starts[1], starts[2])            # unperturbed copies
        assert not torch.equal(starts[1], starts[3])        # perturbed copy
        if s > 1:
            prev = SnapshotStore(outdir.store_dir(stages, f"stage_{s - 1:02d}"))
            i = outdir.last_index(prev, trajectory=1)
            assert int(prev.entries[i]["epoch"]) == 1
            assert torch.equal(starts[1], prev.load_flat(i))
    for f in ("mds_all_layer2", "mds_all_layer5", "mds_late_layer2", "mds_late_layer5"):
        emb = json.loads((stages / "metrics" / f"{f}.json").read_text())
        n = 3 * 3 * 2 if "all" in f else 2 * 3 * 2
        assert len(emb["coords"]) == n
        assert (stages / "figures" / f"{f}.png").exists()
    assert (stages / "figures" / "mds_all_layer2_per_stage.png").exists()


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_stages_resume_and_redraw(stages):
    before = _snapshot_state(stages)
    assert cli.main(["sgd-stages", "--out", str(stages), "--resume"] + TINY_DATA + [
        "--set", "stages=3", "--set", "trajectories=3", "--set", "unperturbed=2", "--set", "epochs_per_stage=1",
        "--set", "late_from_stage=2", "--set", "batch_size=30"]) == 0
    assert _snapshot_state(stages) == before
    _check_redraw(stages)


@pytest.mark.slow  # end-to-end, > 5 s on 2 cores; CI runs it (pytest -m 'not slow' skips it)
def test_random_labels_variants(tmp_path):
    out = tmp_path / "rl"
    _run("random-labels", out, "stages=2", "trajectories=2", "unperturbed=1", "epochs_per_stage=1",
         "late_from_stage=2", "mds_layers=2", "batch_size=30")
    for v, labels, inputs in (("random-labels", "random", "real"), ("random-inputs", "random", "random")):
        name, cfg = outdir.read_config(out / v)
        assert name == "sgd-stages" and cfg["labels"] == labels and cfg["inputs"] == inputs
        assert (out / v / "figures" / "mds_all_layer2.png").exists()
    _check_redraw(out)


# ---------------------------------------------------------------------------- polynomial, overparam
def test_polynomial(tmp_path):
    out = tmp_path / "po"
    _run("polynomial", out, "epochs=1", "activations=relu,poly2", "batch_size=30")
    rows = {a: outdir.read_table(out / "metrics" / a) for a in ("relu", "poly2")}
    assert [r["epoch"] for r in rows["relu"]] == [0, 1]
    # same initial weights for every activation: the trainer's epoch-0 snapshots are equal
    s = [SnapshotStore(outdir.store_dir(out, a)) for a in ("relu", "poly2")]
    assert torch.equal(s[0].load_flat(s[0].select(epoch=0)[0]), s[1].load_flat(s[1].select(epoch=0)[0]))
    with pytest.raises(ValueError, match="polyN"):
        polynomial.parse_activation("cubic")
    _check_redraw(out)


def test_overparam(tmp_path):
    out = tmp_path / "ov"
    assert cli.main(["overparam", "--out", str(out), "--set", "epochs=1", "--set", "widths=0.0625,0.125",
                     "--set", "train_sizes=40,80", "--set", "threads=1", "--set", "batch_size=20"]) == 0
    rows = outdir.read_table(out / "metrics" / "final")
    assert len(rows) == 4
    p = {r["width"]: r["parameters"] for r in rows}
    assert p[0.125] > p[0.0625]
    assert all(0 <= r["test_error"] <= 1 for r in rows)
    _check_redraw(out)
