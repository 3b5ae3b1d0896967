"""benchmarks/compare.py: two runs' ratios side by side, with the verdict
`same` exactly where the repetitions' [min-max] ranges overlap."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import compare  # noqa: E402


def _run(ratios):
    return {"meta": {}, "results": {"jax": {"models": {"mlp": {"ratios": ratios}}}}}


def test_compare_verdicts_follow_range_overlap():
    before = _run({"sam/plain": {"median": 2.0, "min": 1.9, "max": 2.1},
                   "ssam/sam": {"median": 1.0, "min": 0.98, "max": 1.02},
                   "only/before": {"median": 1.0, "min": 1.0, "max": 1.0}})
    after = _run({"sam/plain": {"median": 2.05, "min": 2.1, "max": 2.2},  # touches: same
                  "ssam/sam": {"median": 1.2, "min": 1.1, "max": 1.3}})  # disjoint: changed
    lines = compare.compare(before, after)
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert set(rows) == {"sam/plain", "ssam/sam"}
    assert rows["sam/plain"].endswith("same") and "+2%" in rows["sam/plain"]
    assert rows["ssam/sam"].endswith("CHANGED") and "+20%" in rows["ssam/sam"]
    assert lines[-1] == "1 of 2 ratios changed beyond the repetitions' range"
