"""The scaling benchmark in its smoke mode, so it cannot rot (no timing is asserted)."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCALE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_power_fit_recovers_a_known_law_and_parameter_count_matches_the_model():
    scale = _scale_module()
    xs = [1e5, 1e6, 1e7]
    c, a = scale.fit_power(xs, [3.0 * x**0.5 for x in xs])
    assert c == pytest.approx(3.0, rel=1e-9) and a == pytest.approx(0.5, rel=1e-9)
    assert scale.fit_power([1e6], [1.0]) is None

    from polca_lightning.toy import TinyTransformer

    model = TinyTransformer(vocab=scale.VOCAB, d_model=64, n_layers=2, n_heads=1, max_len=scale.CONTEXT)
    assert scale.n_params(64, 2) == sum(p.numel() for p in model.parameters())


def test_scale_quick_prints_every_table(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        [sys.executable, str(SCALE), "--quick", "--sizes", "32:1", "--k", "1", "--probe", "2", "--snapshots", "2",
         "--repeat", "1", "--max-hvp", "3", "--converge-below", "0", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert out.read_text().strip() == text.strip()
    for header in ("| size | params | d_model x layers | forward pass |", "1st order s/snap/dir", "s/HVP",
                   "| size | setup | snapshot | interval | eigensolve | backfill | io |",
                   "| size | model meas. | model comp. | basis comp. | eigensolve meas. | Krylov comp. |",
                   "writer queue meas.", "| size | weights/snapshot |", "Fits need at least two sizes"):
        assert header in text, header
    row = next(line for line in text.splitlines() if line.startswith("| 0.15M | 146,912 | 32 x 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[11] == "3 (capped at 3)"  # HVPs: the cap was honoured and counted
    assert all(math.isfinite(float(cells[i].removesuffix(" s"))) for i in (3, 4, 6, 7, 8, 9, 10))


def test_check_tolerance_prints_a_row_per_model_and_every_honest_path_passes():
    script = SCALE.parent / "check_tolerance.py"
    proc = subprocess.run([sys.executable, str(script), "--sizes", "32x1,64x1", "--seeds", "2"], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SCALE.parents[1])},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if line.strip()]
    assert len(rows) == 4
    for row in rows:
        assert row[6] == "True"  # the activation path agrees with per-sample Jacobians within the check
        assert float(row[2]) < float(row[5]) / 10  # its largest scaled difference, under the check's atol


def test_device_check_dry_run_writes_every_step_ok(tmp_path):
    """benchmarks/device_check.py --dry-run: every step at toy size, each ok, the JSON's keys complete."""
    import json

    out = tmp_path / "check" / "device_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCALE.parent / "device_check.py"), "--dry-run", "--out", str(out)], capture_output=True,
        text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(SCALE.parents[1])},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"script", "commit", "argv", "dry_run", "budget_s", "complete", "missing_packages", "device", "steps",
            "wall_s"} <= set(data)
    assert data["dry_run"] is True and data["complete"] is True and data["missing_packages"] == []
    device = data["device"]
    assert {"type", "cuda_check", "torch", "cuda", "cuda_available", "python", "cpu_count"} <= set(device)
    assert list(data["steps"]) == ["host_basis", "precision_scopes", "streamed_eigensolver", "engine_passes",
                                   "paper_run"]
    for name, step in data["steps"].items():
        assert step["status"] == "ok", (name, step.get("error"), step.get("traceback"))
        assert step["wall_s"] >= 0 and "error" not in step
        figures = step["figures"]
        assert figures["cuda_check"] is device["cuda_check"] is (device["type"] == "cuda")
        assert all(c["passed"] for c in figures.get("checks", [])), name
    assert len(data["steps"]["host_basis"]["figures"]["checks"]) >= 10  # every comparison recorded with its bound
    costs = data["steps"]["engine_passes"]["figures"]
    assert [row["k"] for row in costs["by_k"]] == [1, 4]
    for row in costs["by_k"]:
        assert set(row["passes"]) == set(row["estimate_passes"]) == {"forward", "reverse"}
        assert row["auto_picks"] in ("forward", "reverse")
    run = data["steps"]["paper_run"]["figures"]
    assert run["flags"][0] == "--paper" and "--steps" in run["flags"] and run["trims"]
    # the time model's schedule is the callback's: as many snapshots and basis vectors as the store holds
    assert (run["results"]["snapshots"], run["results"]["basis"]) == (run["plan"]["snapshots"], run["plan"]["basis"])
    hidden = run["hidden"]
    assert hidden["trajectory_types"] and set(hidden["hidden_fraction"]) == set(hidden["trajectory_types"])
    assert "hidden_fraction_paper" in hidden and "tau" in hidden
    assert "appendix G" in proc.stdout  # the example's own table, printed


def test_paper_costs_time_model_counts_the_runs_snapshots_and_vectors(tmp_path):
    """benchmarks/paper_costs.py's table: make paper's schedule (101 snapshots, 8 vectors) and the
    paper's (501, 50), the eigensolves of a 1,250-problem Hessian sample at that sample's product
    cost, and a finished run's measured parts beside the prediction."""
    import json

    sys.path.insert(0, str(SCALE.parent))
    import paper_costs

    costs = dict(d=9_475_594, batch_problems=200, train_step=0.3, loss_batch=1.0, forward_per_direction=4.0,
                 reverse_base=3.0, reverse_per_direction=1.0, calibration=30.0, hvp=2.0, hvp_1250=10.0,
                 eigensolve=100.0, eigensolve_hvps=50, write_snapshot=0.5, read_snapshot=0.3, clustering=5.0,
                 clustering_tokens=5000)
    rows = paper_costs.predictions(costs)
    first, paper = rows[0], rows[-1]
    assert (first["snapshots"], first["basis"], first["lca_directions"]) == (101, 8, 0)
    assert (paper["snapshots"], paper["basis"], paper["lca_directions"]) == (501, 50, 50)
    assert paper["seconds"]["eigensolves"] == pytest.approx(50 * 100.0 * 10.0 / 2.0)  # 5x the products' cost
    assert first["seconds"]["eigensolves"] == pytest.approx(8 * 100.0)
    assert first["seconds"]["train"] == pytest.approx(10_000 * (0.3 + 0.004))
    lines = paper_costs.table(rows).splitlines()
    assert len(lines) == 2 + len(paper_costs.SETTINGS) and lines[2].endswith("| 1.0 |")
    (tmp_path / "results.json").write_text(json.dumps({"timings": {
        "fit": 9000.0, "setup": 50.0, "snapshot": 1.0, "interval": 3000.0, "io": 100.0, "eigensolve": 800.0,
        "backfill": 700.0}}))
    text = paper_costs.measured(tmp_path, first)
    assert "| eigensolves | 13 min | 13 min | 1.00 |" in text
    assert "| total | 2.5 h |" in text
