"""Runs the test suite once per Keras backend and fails if any backend fails.

    python scripts/test_all_backends.py [--backends tensorflow,jax,torch] [pytest args...]

Each backend runs in its own process (Keras picks the backend at import time
from KERAS_BACKEND). The last line sums the counts over all backends.
"""

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")


def _counts(junit_path):
    if not os.path.exists(junit_path):
        return None
    root = ET.parse(junit_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args, pytest_args = parser.parse_known_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {BACKENDS}")

    results_dir = os.path.join(ROOT, "test-results")
    os.makedirs(results_dir, exist_ok=True)
    summary = []
    for backend in backends:
        junit = os.path.join(results_dir, f"{backend}.xml")
        if os.path.exists(junit):
            os.remove(junit)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
        print(f"\n===== KERAS_BACKEND={backend} =====", flush=True)
        start = time.time()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", f"--junitxml={junit}", "-p", "no:cacheprovider", *pytest_args],
            cwd=ROOT,
            env=env,
        )
        summary.append((backend, code, _counts(junit), time.time() - start))

    passed = failed = skipped = 0
    print("\n===== summary =====")
    ok = True
    for backend, code, counts, seconds in summary:
        if counts is None:
            print(f"{backend}: pytest exited {code} without a report")
            ok = False
            failed += 1
            continue
        bad = counts["failures"] + counts["errors"]
        good = counts["tests"] - bad - counts["skipped"]
        passed, failed, skipped = passed + good, failed + bad, skipped + counts["skipped"]
        # pytest exits 5 when it collected no test: that is a failure here.
        if code != 0 or counts["tests"] == 0:
            ok = False
        print(f"{backend}: {good} passed, {bad} failed, {counts['skipped']} skipped "
              f"(exit {code}, {seconds:.0f} s)")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
