"""Tutorials run in smoke mode and benchmarks in quick mode, so neither can rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.py"))
BENCHMARKS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def _run(args, tmp_path, env_extra=None):
    env = {**os.environ, "CI": "1", "MPLBACKEND": "Agg", **(env_extra or {})}
    out = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.mark.scripts
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs_in_smoke_mode(path, tmp_path):
    _run([str(path)], tmp_path)


@pytest.mark.scripts
@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_runs_in_quick_mode(path, tmp_path):
    stdout = _run([str(path), "--quick", "--out", str(tmp_path)], tmp_path)
    assert "|" in stdout  # a markdown table
    assert list(tmp_path.glob("*.png")), "no figure written"


@pytest.mark.scripts
def test_density_seed_report_summarizes_seeds(tmp_path):
    """Two quick runs with different seeds; the summary's mean is the mean of their KLs."""
    import json

    script = str(ROOT / "benchmarks" / "density.py")
    kls = []
    for seed in (0, 1):
        out = tmp_path / str(seed)
        args = ["--quick", "--datasets", "8gaussians", "--models", "gmm", "--no-report"]
        _run([script, *args, "--seed", str(seed), "--out", str(out)], tmp_path)
        (path,) = out.glob("density-*.json")
        kls.append(json.loads(path.read_text())["records"][0]["kl"])
    paths = [str(p) for p in sorted(tmp_path.glob("*/density-*.json"))]
    _run([script, "--seed-report", *paths, "--out", str(tmp_path)], tmp_path)
    text = (tmp_path / "density-seeds.md").read_text()
    assert f"| GMM diag, EM + Adam (ours) | {sum(kls) / 2:.3f} ± " in text
    assert f"8gaussians, GMM diag, EM + Adam (ours): 0: {kls[0]:.3f}, 1: {kls[1]:.3f}" in text


@pytest.mark.scripts
def test_density_rad_ablation_changes_the_model(tmp_path):
    """Each RAD ablation builds the RAD it names: plain MLPs 96 or 64 wide, no folds no gates."""
    import json

    script = str(ROOT / "benchmarks" / "density.py")
    models = ["rad", "rad-mlp96", "rad-64", "rad-nofold"]
    args = ["--quick", "--datasets", "8gaussians", "--models", *models]
    _run([script, *args, "--no-report", "--out", str(tmp_path)], tmp_path)
    (path,) = tmp_path.glob("density-*.json")
    records = {r["model"]: r for r in json.loads(path.read_text())["records"]}
    assert set(records) == set(models)
    assert all(r["kl"] is not None and not r["error"] for r in records.values())
    params = {name: r["num_params"] for name, r in records.items()}
    assert params["rad"] < params["rad-64"]  # the quick budget's RAD is 12 wide
    assert params["rad-64"] < params["rad-mlp96"]
    assert params["rad-nofold"] < params["rad-64"]


def test_density_empty_square_mass_is_what_leaks_across_edges(monkeypatch):
    """The checkerboard table's grid sum: 0 for the truth itself, about 1/2 for a uniform
    density on the bounds, about 1 for the board with its colours swapped."""
    import importlib

    import numpy as np

    from pyro_mixflow import datasets

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    density = importlib.import_module("density")
    board = datasets.load("checkerboard")
    bounds = {"checkerboard": board.bounds}
    size = 150

    points = density.grid_points(board.bounds, size)
    truth = board.log_prob(points).reshape(size, size).numpy()
    grids = {
        "checkerboard/truth": truth,
        "checkerboard/gmm": truth,
        "checkerboard/cwm": np.full_like(truth, -np.log(64.0)),
        "checkerboard/rad": np.where(np.isinf(truth), truth.max(), -np.inf),
    }
    lines = density._empty_squares(grids, bounds, ["gmm", "cwm", "rad"])
    rows = [line.split("|") for line in lines if "(ours)" in line]
    leaked = [float(row[2]) for row in rows]
    assert leaked[0] == 0.0
    assert abs(leaked[1] - 0.5) < 0.02  # grid points on the bounds' edges: ~1% more
    assert leaked[2] > 0.9
    assert density._empty_squares({}, bounds, ["gmm"]) == []


def test_sbi_report_checks_the_targets_per_column_and_overall(monkeypatch, tmp_path):
    """The NPE report marks a column met only when our best is at or below sbi's best, and the
    overall target only when our best mean is below every sbi estimator's."""
    import argparse
    import importlib.util

    pytest.importorskip("sbi")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("sbi_benchmark", ROOT / "benchmarks" / "sbi.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look themselves up
    spec.loader.exec_module(bench)

    def cell(*scores):
        record = {"seconds": 1.0, "epochs": 3, "params": 10, "other_cpu": 0.0}
        return {**record, "c2st": {str(i + 1): s for i, s in enumerate(scores)}}

    cells = {
        "two_moons/1000/gmm": cell(0.60, 0.62),  # mean 0.61 <= nsf 0.65: met
        "two_moons/1000/nsf": cell(0.64, 0.66),
        "slcp/1000/gmm": cell(0.90, 0.92),  # mean 0.91 > nsf 0.85: not met
        "slcp/1000/nsf": cell(0.85, 0.85),
        "slcp/1000/mdn": cell(0.95, 0.95, 0.5),  # observation 3 is not in the report
        "slcp/1000/maf": cell(0.5),  # not scored on observation 2 yet: left out
        "two_moons/1000/mdn": cell(0.80, 0.80, 0.74),  # its anchor is over observations 1-3
    }
    # Runs with other seeds: slcp's GMM and nsf again (seed 1), mdn scored on one observation.
    seeds = {
        "slcp/1000/gmm": {"1": cell(0.80, 0.82)},  # seeds 0 and 1: 0.860
        "slcp/1000/nsf": {"1": cell(0.95, 0.95)},  # 0.900: met over seeds
        "slcp/1000/mdn": {"1": cell(0.5)},  # incomplete: dropped
    }
    merged = {"cells": cells, "figure": {}, "environment": ["env"], "config": [{}], "seeds": seeds}
    text = bench.report(bench.restrict(merged, [1, 2]), tmp_path)
    assert "| slcp 1,000 | GMM (MDN, ours) | 0.910 | 0.810 | 0.860 ± 0.050 |" in text
    assert "| slcp 1,000 | sbi nsf | 0.850 | 0.950 | 0.900 ± 0.050 |" in text
    assert "| slcp 1,000 | sbi mdn |" not in text
    assert "Targets over seeds 0, 1:" in text
    assert "anchors (observations 1-3): two_moons 1,000 mdn: 0.792 (this run: 0.780)." in text
    assert "- slcp 1,000: ours best GMM (MDN, ours) 0.860, sbi best sbi nsf 0.900: met." in text
    assert "C2ST mean ± standard error over observations 1-2" in text
    assert "Not yet scored on every observation: slcp/1000/maf (1 of 2)" in text
    assert "| sbi maf | – | – | nan |" in text
    assert "two_moons 1,000: ours best GMM (MDN, ours) 0.610, sbi best sbi nsf 0.650: met." in text
    assert "slcp 1,000: ours best GMM (MDN, ours) 0.910, sbi best sbi nsf 0.850: not met." in text
    # Our mean 0.760 is below mdn's 0.875 but not below nsf's 0.750.
    assert "ours best GMM (MDN, ours) 0.760, below each of sbi's (0.875, 0.750): not met." in text
    assert "| GMM (MDN, ours) | **0.610 ± 0.010** | 0.910 ± 0.010 | 0.760 |" in text
    assert (tmp_path / "sbi.md").read_text() == text
    assert (tmp_path / "sbi.png").exists()
    assert bench.observations("1-3") == [1, 2, 3]
    # A retrained cell keeps its scores only when it is the same estimator.
    stored = cell(0.7)
    assert bench.reproduces(
        {**stored, "best_validation_loss": 1.5}, {**stored, "best_validation_loss": 1.5}
    )
    assert not bench.reproduces(
        {**stored, "epochs": 4, "best_validation_loss": 1.5},
        {**stored, "best_validation_loss": 1.5},
    )
    assert bench.observations("2,7") == [2, 7]
    # Record files of another seed go beside the table, not into it.
    for tag, seed, score in (("a", 0, 0.6), ("b", 1, 0.7)):
        part = {"cells": {"slcp/1000/gmm": cell(score)}, "figure": {"slcp/gmm": [[seed]]}}
        part |= {"environment": "env", "config": {"seed": seed}}
        (tmp_path / f"sbi-{tag}.json").write_text(json.dumps(part))
    merged = bench.merge(sorted(tmp_path.glob("sbi-*.json")))
    assert merged["cells"]["slcp/1000/gmm"]["c2st"] == {"1": 0.6}
    assert merged["seeds"] == {"slcp/1000/gmm": {"1": cell(0.7)}}
    assert merged["figure"] == {"slcp/gmm": [[0]]}
    with pytest.raises(argparse.ArgumentTypeError, match="observations are 1 to 10"):
        bench.observations("0-11")
