"""Runs the test suite once per Keras backend and fails if any backend fails.

    python scripts/test_all_backends.py [--backends tensorflow,jax,torch]
        [--keras oldest|VERSION] [pytest args...]

Each backend runs in its own process (Keras picks the backend at import time
from KERAS_BACKEND). The last line sums the counts over all backends.

`--keras oldest` runs against the oldest Keras that pyproject.toml declares
(the `keras>=X` of its `dependencies`, the one place that version is
written); `--keras 3.13.2` against that version. That Keras alone is
installed, without its dependencies (the environment's satisfy them; this is
checked), into the git-ignored `.keras-versions/<version>/` and put first on
PYTHONPATH; TensorFlow, JAX and torch stay the environment's.
"""

import argparse
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("tensorflow", "jax", "torch")
KERAS_DIR = os.path.join(ROOT, ".keras-versions")


def _oldest_keras():
    """The X of `keras>=X` in pyproject.toml's `dependencies`."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        for line in f:
            if line.strip().startswith("dependencies"):
                match = re.search(r"""["']keras\s*>=\s*([0-9][0-9.]*)""", line)
                if match:
                    return match.group(1)
    sys.exit("scripts/test_all_backends.py: no `keras>=X` in pyproject.toml's dependencies line")


def _keras_path(version):
    """Folder holding only Keras `version` (installed there once, no deps)."""
    target = os.path.join(KERAS_DIR, version)
    if not os.path.exists(os.path.join(target, "keras", "__init__.py")):
        print(f"installing keras=={version} (without dependencies) into {target}", flush=True)
        subprocess.check_call(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--target", target, f"keras=={version}"]
        )
    # Keras from `target`, everything else from this environment: check that
    # the environment satisfies that Keras's own requirements.
    check = (
        "import importlib.metadata as m, sys, keras\n"
        "from packaging.requirements import Requirement\n"
        "d = m.distribution('keras')\n"
        "bad = []\n"
        "for r in map(Requirement, d.requires or []):\n"
        "    if r.marker is not None and not r.marker.evaluate({'extra': ''}):\n"
        "        continue\n"
        "    try:\n"
        "        v = m.version(r.name)\n"
        "    except m.PackageNotFoundError:\n"
        "        v = None\n"
        "    if v is None or not r.specifier.contains(v, prereleases=True):\n"
        "        bad.append(f'{r} (have {v})')\n"
        "print(keras.__version__, keras.__file__)\n"
        "sys.exit('unmet requirements of keras: ' + ', '.join(bad) if bad else 0)\n"
    )
    env = dict(os.environ, PYTHONPATH=_pythonpath(target), KERAS_BACKEND="numpy")
    out = subprocess.run(
        [sys.executable, "-c", check], env=env, cwd=ROOT, capture_output=True, text=True
    )
    got = out.stdout.split()
    if out.returncode != 0 or not got or got[0].split("+")[0] != _release(version):
        sys.exit(
            f"keras=={version} from {target} is not usable here "
            f"(got {out.stdout.strip()!r}):\n{out.stderr.strip()}"
        )
    print(f"keras {got[0]} from {got[1]}", flush=True)
    return target


def _release(version):
    """`3.12` -> `3.12.0`: the version string Keras reports for `keras==3.12`."""
    parts = version.split(".")
    return ".".join(parts + ["0"] * (3 - len(parts)))


def _pythonpath(first):
    rest = os.environ.get("PYTHONPATH")
    return first if not rest else first + os.pathsep + rest


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
    parser.add_argument(
        "--keras", metavar="oldest|VERSION",
        help="test under this Keras instead of the installed one; "
        "`oldest` is the lower bound in pyproject.toml",
    )
    args, pytest_args = parser.parse_known_args()
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {BACKENDS}")

    base_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    prefix = ""
    if args.keras:
        version = _release(_oldest_keras() if args.keras == "oldest" else args.keras)
        base_env["PYTHONPATH"] = _pythonpath(_keras_path(version))
        prefix = f"keras-{version}-"

    results_dir = os.path.join(ROOT, "test-results")
    os.makedirs(results_dir, exist_ok=True)
    summary = []
    for backend in backends:
        junit = os.path.join(results_dir, f"{prefix}{backend}.xml")
        if os.path.exists(junit):
            os.remove(junit)
        env = dict(base_env, KERAS_BACKEND=backend)
        print(f"\n===== {prefix.replace('-', ' ')}KERAS_BACKEND={backend} =====", flush=True)
        start = time.time()
        code = subprocess.call(
            [sys.executable, "-m", "pytest", f"--junitxml={junit}", "-p", "no:cacheprovider", *pytest_args],
            cwd=ROOT,
            env=env,
        )
        summary.append((backend, code, _counts(junit), time.time() - start))

    passed = failed = skipped = 0
    print(f"\n===== {prefix.replace('-', ' ')}summary =====")
    ok = True
    for backend, code, counts, seconds in summary:
        if counts is None:
            print(f"{backend}: pytest exited {code} without a report")
            ok = False
            failed += 1
            continue
        bad = counts["failures"] + counts["errors"]
        good = counts["tests"] - bad - counts["skipped"]
        # pytest exits 5 when it collected no test: that is a failure here.
        if code != 0 or counts["tests"] == 0:
            ok = False
            # A run that failed with no failing test in its report (usage
            # error, nothing collected) counts as one failure in the sums.
            bad = max(bad, 1)
        passed, failed, skipped = passed + good, failed + bad, skipped + counts["skipped"]
        print(f"{backend}: {good} passed, {bad} failed, {counts['skipped']} skipped "
              f"(exit {code}, {seconds:.0f} s)")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
