"""examples/plain_cost_sam.py's CI mode (`--quick`) runs under the current
backend, and the numbers it writes are sane: every method on both datasets,
accuracies in [0, 1], the gradient evaluations per step each method must
have, finite time ratios and Hessian eigenvalues, and SGD's accuracy at the
equal budgets read from its long runs. (No timing or accuracy thresholds:
two epochs on a few hundred examples decide nothing.)
"""

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import BACKEND

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "plain_cost_sam.py")
METHODS = ("SGD", "SAM", "SSAM", "MomentumSAM", "RandomSAM", "AE-SSAM", "LookSAM", "late-SSAM")
# --quick: 2 epochs of 10 steps on each dataset (320 digits, 300 MADELON
# training examples, batch 32). LookSAM k=5 runs the perturbed pass at
# iterations 0, 5, 10, 15; late-SSAM from epoch 2 (round(0.7 * 2) = 1) on.
PASSES = {"SGD": 1.0, "SAM": 2.0, "SSAM": 2.0, "MomentumSAM": 1.0, "RandomSAM": 1.0, "LookSAM": 1.2,
          "late-SSAM": 1.5}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain_cost")
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1200,
        env=dict(os.environ, KERAS_BACKEND=BACKEND, MPLBACKEND="Agg"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_outputs_and_tables(quick_run):
    out, stdout = quick_run
    assert (out / "plain_cost_sam.png").stat().st_size > 0
    result = json.loads((out / "plain_cost_sam.json").read_text())
    assert result["backend"] == BACKEND
    assert set(result["results"]) == {"digits", "madelon"}
    for name in ("digits", "madelon"):
        assert f"### {name}" in stdout
        for method in METHODS:
            assert f"| {method} |" in result["results"][name]["table_markdown"]


@pytest.mark.parametrize("dataset", ["digits", "madelon"])
def test_numbers_are_sane(quick_run, dataset):
    out, _ = quick_run
    res = json.loads((out / "plain_cost_sam.json").read_text())["results"][dataset]
    rows = {r["method"]: r for r in res["summary"]}
    assert set(rows) == set(METHODS)
    for method, row in rows.items():
        assert row["n"] == 1 and 0.0 <= row["mean"] <= 1.0, row
        assert math.isfinite(row["time_vs_sgd"]) and row["time_vs_sgd"] > 0, row
        eig = row["top_eigenvalue_mean"]
        assert eig is not None and math.isfinite(eig), row
        if method == "SGD":
            assert row["time_vs_sgd"] == pytest.approx(1.0)
            continue
        for key in ("sgd_at_equal_time", "sgd_at_equal_gradients"):
            budget = row[key]
            assert budget is not None and 0.0 <= budget["mean"] <= 1.0, (method, key, budget)
            assert all(1 <= e <= 5 for e in budget["epochs"]), (method, key, budget)
    passes = {m: r["gradient_evaluations_per_step"] for m, r in rows.items()}
    assert {m: passes[m] for m in PASSES} == pytest.approx(PASSES, abs=1e-6), passes
    # Adaptive steps: data dependent, between a plain and a SAM step.
    assert 1.0 <= passes["AE-SSAM"] <= 2.0, passes
    # SAM at equal gradient evaluations: SGD trained 2 x 2 epochs.
    assert rows["SAM"]["sgd_at_equal_gradients"]["epochs"] == [4]
    # The long SGD runs: ceil(2.5 x 2) epochs, the test accuracy after each.
    budget_runs = [r for r in res["runs"] if r["method"] == "SGD-budget"]
    assert len(budget_runs) == 1 and len(budget_runs[0]["test_accuracy_per_epoch"]) == 5
    assert all(0.0 <= a <= 1.0 for a in budget_runs[0]["test_accuracy_per_epoch"])
    # The one-pass variants log their only pass as the perturbed one.
    one_pass = {r["method"] for r in res["runs"] if r["single_pass"]}
    assert one_pass == {"MomentumSAM", "RandomSAM"}
