"""Compares the step-time ratios of two benchmark runs (bench.json files).

    python benchmarks/compare.py BEFORE/bench.json AFTER/bench.json

For each ratio both runs measured, per backend and model: the median over
repetitions and its [min-max], before and after, the median's relative
change, and `same` where the two
ranges overlap (a change within the run-to-run noise) or `CHANGED` where they
do not. Both runs must use the same options (models, sizes, steps); a run of
another checkout's keras_ssam is made with `PYTHONPATH=<checkout>` (its JSON
records `keras_ssam_file`). Measures nothing; prints a table.
"""

import json
import sys


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def compare(before: dict, after: dict) -> list[str]:
    """The table's lines: one per (ratio, backend, model) both runs hold."""
    lines = [f"{'ratio':<28} {'backend':<11} {'model':<7} {'before':>20} {'after':>20} {'median':>7}  verdict"]
    changed = 0
    for backend, res_b in before["results"].items():
        res_a = after["results"].get(backend)
        if not res_a or "error" in res_a or "error" in res_b:
            continue
        for model, entry_b in res_b["models"].items():
            entry_a = res_a["models"].get(model)
            if entry_a is None:
                continue
            for key, rb in entry_b["ratios"].items():
                ra = entry_a["ratios"].get(key)
                if ra is None:
                    continue
                overlap = rb["min"] <= ra["max"] and ra["min"] <= rb["max"]
                changed += not overlap
                cells = [f"{r['median']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" for r in (rb, ra)]
                move = f"{100 * (ra['median'] / rb['median'] - 1):+.0f}%"
                lines.append(f"{key:<28} {backend:<11} {model:<7} {cells[0]:>20} {cells[1]:>20} {move:>7}  "
                             f"{'same' if overlap else 'CHANGED'}")
    lines.append(f"{changed} of {len(lines) - 1} ratios changed beyond the repetitions' range")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    before, after = (load(p) for p in argv)
    for key in ("reps", "steps", "batch_size", "sizes"):
        b, a = before["meta"].get(key), after["meta"].get(key)
        if b != a:
            print(f"warning: the runs differ in {key}: {b} against {a}")
    print("\n".join(compare(before, after)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
