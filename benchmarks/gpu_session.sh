#!/usr/bin/env bash
# Everything a session lent an NVIDIA GPU runs, in one go (see README "On an NVIDIA GPU machine").
#   bash benchmarks/gpu_session.sh OUT_DIR [LABEL=checkpoint.pt ...]
# Installs dtop-export without touching the machine's torch (no deps; wheels under .whl/ first if present),
# prints the GPU and what is importable, runs `dtop-export trt --self-test --full` (exit 2 when TensorRT is
# missing), the `gpu` tests, and, for the checkpoints given, real FP16 on the GPU vs fp32
# (benchmarks/gpu_fp16_whitening.py). Every result lands in OUT_DIR.
set -u
out=${1:?usage: gpu_session.sh OUT_DIR [LABEL=checkpoint.pt ...]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 - <<'PY' | tee "$out/imports.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for name in ("tensorrt", "onnxruntime"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "get_available_providers", lambda: "")())
    except Exception as e:  # noqa: BLE001
        print(name, "not importable:", e.__class__.__name__, e)
PY
python3 -m dtop_export trt --self-test --full --json "$out/selftest.json" 2>&1 | tee "$out/selftest.txt"
echo "self-test exit code: ${PIPESTATUS[0]}" | tee -a "$out/selftest.txt"
python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/test_tensorrt.py 2>&1 | tail -6 | tee "$out/pytest-gpu.txt"
if [ "$#" -gt 0 ]; then
    python3 benchmarks/gpu_fp16_whitening.py "$@" --json "$out/gpu_fp16_whitening.json" 2>&1 | tee "$out/gpu_fp16.txt"
fi
