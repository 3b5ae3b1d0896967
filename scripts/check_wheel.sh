#!/usr/bin/env bash
# check_wheel.sh: the release a user installs works, away from the checkout.
#
#     bash scripts/check_wheel.sh          # needs `build` and `twine` (the `release` extra)
#
#  1. `python -m build` makes the sdist and the wheel (the wheel from the sdist), and `twine check` passes on both;
#  2. a fresh virtual environment in a temporary folder gets the wheel (not the checkout) and one backend, JAX;
#  3. there, `import keras_ssam` must come from the installed wheel and report pyproject.toml's version, and the
#     README's example (README.md's first python block, read from the file so that the check cannot drift) runs.
# PYTHON picks the interpreter (default: python); CHECK_WHEEL_BACKEND the backend package (default: jax).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python}"
BACKEND="${CHECK_WHEEL_BACKEND:-jax}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "== 1/3 build and twine check"
"$PYTHON" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }
ls "$WORK/dist"
"$PYTHON" -m twine check --strict "$WORK"/dist/*
wheel="$(ls "$WORK"/dist/keras_ssam-*.whl)"

echo "== 2/3 fresh environment: $(basename "$wheel") + $BACKEND"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$wheel" "$BACKEND"

echo "== 3/3 import and the README's example (KERAS_BACKEND=$BACKEND)"
"$PYTHON" - "$ROOT/README.md" "$WORK/readme_example.py" <<'PY'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
block = re.search(r"^```python\n(.*?)^```", text, re.M | re.S)
if block is None:
    sys.exit("check_wheel: README.md has no python block")
open(sys.argv[2], "w", encoding="utf-8").write(block.group(1))
PY
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml")"
cd "$WORK"  # not the checkout: `import keras_ssam` must find the installed wheel
export KERAS_BACKEND="$BACKEND" TF_CPP_MIN_LOG_LEVEL=2
env -u PYTHONPATH "$WORK/venv/bin/python" - "$ROOT" "$version" <<'PY'
import os, sys
import keras_ssam
root, version = sys.argv[1:]
where = os.path.realpath(keras_ssam.__file__)
assert not where.startswith(os.path.realpath(root) + os.sep), f"keras_ssam imported from the checkout: {where}"
assert keras_ssam.__version__ == version, (keras_ssam.__version__, version)
print(f"keras_ssam {keras_ssam.__version__} from {where}")
PY
env -u PYTHONPATH "$WORK/venv/bin/python" "$WORK/readme_example.py"
echo "check_wheel: OK"
