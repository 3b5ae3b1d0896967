"""Every example's CI mode (`--quick`, `--synthetic`, simulated devices) runs
to completion under the current backend and produces what it promises.

The examples check their own numbers where they can (the quadratic example
exits non-zero when a run disagrees with its closed-form edge); here we check
the exit status and the outputs.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import BACKEND

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def run_example(name, *args, env=None):
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, KERAS_BACKEND=BACKEND, MPLBACKEND="Agg", **(env or {})),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_quickstart_prints_the_three_methods():
    stdout = run_example("quickstart.py", "--quick")
    for method in ("SGD", "SAM", "SSAM"):
        assert any(line.split()[:1] == [method] for line in stdout.splitlines()), stdout


@pytest.mark.parametrize("name", ["quadratic_lr_regimes.py", "saddle_escape.py"])
def test_closed_form_examples_pass_their_checks(name, tmp_path):
    # These scripts compare their runs with the closed forms and exit 1 on a
    # mismatch; --quick skips only the plot.
    stdout = run_example(name, "--quick", "--out", str(tmp_path))
    assert "all checks passed" in stdout


def test_lr_sweep_quick_writes_its_plot(tmp_path):
    run_example("lr_sweep_digits.py", "--quick", "--out", str(tmp_path))
    assert (tmp_path / "lr_sweep_digits.png").stat().st_size > 0


def test_cifar10_resnet_synthetic_steps(tmp_path):
    stdout = run_example(
        "cifar10_resnet.py", "--synthetic", "--steps", "2", "--width", "8",
        "--batch-size", "16", "--out", str(tmp_path),
    )
    assert "loss" in stdout


def test_distributed_example_on_simulated_devices():
    if BACKEND == "torch":
        pytest.skip("Keras's torch backend has no data-parallel fit")
    stdout = run_example("distributed_training.py", "--cpu-devices", "2", "--epochs", "1")
    assert "scope=global" in stdout


def test_benchmark_smoke_mode(tmp_path):
    """The benchmark's CI mode: it runs and writes its table, JSON and chart
    (the numbers are not checked: no timing assertions in tests)."""
    out = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(EXAMPLES), "benchmarks", "bench.py"),
         "--smoke", "--backends", BACKEND, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("bench.json", "bench.txt", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    # The `_cond` twins keep the compiled conditional, their originals are
    # host-dispatched: the benchmark compares what it says it compares.
    results = json.loads((tmp_path / "bench.json").read_text())["results"][BACKEND]
    for entry in results["models"].values():
        configs = entry["configs"]
        for name in ("looksam_k5", "looksam_k10", "samp_05", "samp_02", "samp_late"):
            assert configs[name]["step_decision"] == "host", name
            assert configs[f"{name}_cond"]["step_decision"] == "conditional", name
        assert configs["samp_0"]["step_decision"] == "static"
        assert configs["plain"]["step_decision"] == "-"
        # No retracing: a conditional step is traced once (TensorFlow's nested
        # tf.functions: twice, as for plain), so nothing after the warm-up; a
        # host-dispatched model has two steps, each traced at its first use,
        # which a short warm-up may not reach (p=0.2): at most twice plain's.
        per_trace = configs["plain"]["traces"]["end"] if BACKEND != "torch" else None
        for name, c in configs.items():
            t = c["traces"]
            if not (t and t["meaningful"]):
                continue
            if c["step_decision"] == "host":
                assert t["end"] <= 2 * per_trace, (name, t)
            else:
                assert t["retraces_after_warmup"] == 0, (name, t)


PROFILES = {"jax": ["xla_cost.py"], "torch": ["profile_torch.py", "--steps", "2"]}


def test_profile_script_of_this_backend():
    """The profile behind the README's explanation of the step cost runs."""
    if BACKEND not in PROFILES:
        pytest.skip("TensorFlow's step has no profile script (the timing table covers it)")
    script, *args = PROFILES[BACKEND]
    out = subprocess.run(
        [sys.executable, os.path.join(os.path.dirname(EXAMPLES), "benchmarks", script), *args],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("plain", "sam", "ssam"):
        assert name in out.stdout


def test_efficient_sam_quick_covers_every_method(tmp_path):
    """The cheap-SAM example's CI mode: every method trains, the skipped steps
    are counted (`sam_step_fraction`), and it writes its JSON and plot."""
    import json

    stdout = run_example("efficient_sam.py", "--quick", "--out", str(tmp_path))
    assert (tmp_path / "efficient_sam.png").stat().st_size > 0
    result = json.loads((tmp_path / "efficient_sam.json").read_text())
    fractions = {r["method"]: r["sam_step_fraction"] for r in result["summary"]}
    assert set(fractions) == {
        "SGD", "SAM", "SSAM", "LookSAM", "LookSAM-stable", "LookSAM-a0.3", "RST-SAM", "RST-SSAM",
        "late-SAM", "late-SSAM",
    }, stdout
    # 2 epochs of 10 steps: LookSAM k=5 perturbs iterations 0, 5, 10, 15; late
    # phase = the second epoch; SAM and SSAM every step, SGD none.
    expected = {"SGD": 0, "SAM": 1, "SSAM": 1, "LookSAM": 0.2, "LookSAM-stable": 0.2,
                "LookSAM-a0.3": 0.2, "late-SAM": 0.5, "late-SSAM": 0.5}
    assert {m: fractions[m] for m in expected} == pytest.approx(expected, abs=1e-6), fractions
    assert 0 < fractions["RST-SAM"] < 1, fractions


def test_sam_family_quick_covers_every_method(tmp_path):
    """The SAM-family example's CI mode: every variant trains a perturbed
    pass on every step, with finite weights, and the JSON and plot exist."""
    import json

    stdout = run_example("sam_family_digits.py", "--quick", "--out", str(tmp_path))
    assert (tmp_path / "sam_family_digits.png").stat().st_size > 0
    result = json.loads((tmp_path / "sam_family_digits.json").read_text())
    fractions = {r["method"]: r["sam_step_fraction"] for r in result["summary"]}
    methods = ("SGD", "SAM", "SSAM", "GSAM", "GSAM-stable", "F-SAM", "F-SAM-stable", "WSAM", "WSAM-stable")
    assert fractions == pytest.approx({m: float(m != "SGD") for m in methods}), stdout
    # The stable and plain forms are different optimizers: their runs differ.
    losses = {r["method"]: r["final_train_loss"] for r in result["runs"]}
    for name in ("GSAM", "F-SAM", "WSAM"):
        assert losses[name] != losses[name + "-stable"], losses
