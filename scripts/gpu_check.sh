#!/usr/bin/env bash
# gpu_check.sh: checks keras_ssam on a GPU machine in one command.
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to results/gpu
#
# Run it from an environment where keras_ssam is installed with the GPU builds
# (README, "Set-up", "GPU": the tensorflow-gpu and jax-cuda extras, torch's CUDA
# build, and the test extra). It
#   1. prints the devices each backend sees, and fails if a backend sees no GPU;
#   2. runs the tests that exercise the train step, mixed precision, state, saving
#      and the step kernels, on each backend (scripts/test_all_backends.py);
#   3. runs benchmarks/bench.py with a short configuration, writing bench.txt,
#      bench.json and bench.png to OUT_DIR.
# It stops at the first step that fails. GPU_CHECK_BACKENDS=jax,torch (default
# tensorflow,jax,torch) limits it to some backends, e.g. one environment per
# backend; PYTHON picks the interpreter (default: python).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${1:-results/gpu}"
BACKENDS="${GPU_CHECK_BACKENDS:-tensorflow,jax,torch}"
PYTHON="${PYTHON:-python}"

# TensorFlow is imported under every backend (Keras uses it for data input);
# without these it and JAX each try to take most of the GPU's memory.
export TF_FORCE_GPU_ALLOW_GROWTH="${TF_FORCE_GPU_ALLOW_GROWTH:-true}"
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

echo "== 1/3 devices (backends: $BACKENDS)"
no_gpu=()
for backend in ${BACKENDS//,/ }; do
    if ! KERAS_BACKEND="$backend" "$PYTHON" - "$backend" <<'EOF'
import sys

backend = sys.argv[1]
try:
    if backend == "tensorflow":
        import tensorflow as tf
        devices = [f"{d.device_type}:{d.name}" for d in tf.config.list_physical_devices()]
        gpus = tf.config.list_physical_devices("GPU")
        version = tf.__version__
    elif backend == "jax":
        import jax
        devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
        version = jax.__version__
    elif backend == "torch":
        import torch
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices = ["cpu"] + [f"cuda:{i} {name}" for i, name in enumerate(gpus)]
        version = f"{torch.__version__} (CUDA {torch.version.cuda})"
    else:
        sys.exit(f"{backend}: unknown backend; choose from tensorflow, jax, torch")
except ImportError as err:
    sys.exit(f"{backend}: cannot import it ({err}); install its GPU build (README, Set-up, GPU)")
print(f"{backend} {version}: {', '.join(devices)}")
if not gpus:
    sys.exit(f"{backend}: sees no GPU (only {', '.join(devices)}); is its GPU build installed "
             f"(README, Set-up, GPU) and a GPU visible (nvidia-smi, CUDA_VISIBLE_DEVICES)?")
EOF
    then
        no_gpu+=("$backend")
    fi
done
if ((${#no_gpu[@]})); then
    echo "gpu_check: FAILED: no GPU for: ${no_gpu[*]}" >&2
    exit 1
fi

echo "== 2/3 tests (train steps, mixed precision, state, saving, kernels, host dispatch and device reads)"
"$PYTHON" scripts/test_all_backends.py --backends "$BACKENDS" \
    tests/test_reference.py tests/test_features.py tests/test_state.py tests/test_kernels.py \
    tests/test_losses.py tests/test_save_load.py tests/test_host_dispatch.py tests/test_plain_cost.py \
    -k "not distributed" -q

echo "== 3/3 benchmark (short: 3 repetitions of 10 steps) -> $OUT_DIR"
mkdir -p "$OUT_DIR"
"$PYTHON" benchmarks/bench.py --backends "$BACKENDS" --reps 3 --steps 10 --memory inline --out "$OUT_DIR"

echo "gpu_check: OK ($BACKENDS; benchmark in $OUT_DIR)"
