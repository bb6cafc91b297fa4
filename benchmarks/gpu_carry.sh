#!/usr/bin/env bash
# What benchmarks/gpu_feed.sh needs carried to a lent GPU machine (no network there; 64 MiB per call), made here
# from PyPI and this repository's history; all three folders are git-ignored:
#   bash benchmarks/gpu_carry.sh [PYTHON_VERSION (default 3.12, the GPU image's)] [BEFORE_REV (default e02e813)]
#   .raypkg/ray-trim.tar.xz  Ray 2.60 without jars/rllib/llm, xz (~26 MB)
#   .whl/                    jsonschema and friends, which Ray needs and the GPU image lacks (the versions the dev
#                            install resolves with Ray 2.60, pinned: a newer one could need what the image lacks)
#   .before/                 dtop_export as of BEFORE_REV (pure Python, no dependencies), for the before/after
#   .trained/model.pt        with TRAINED=PATH: a trained checkpoint (the demo's small one, ~20 MB: `dtop-export
#                            demo` writes dtop-demo/model.pt), whose bf16/fp16 parity the parity phase checks on CUDA
set -euo pipefail
pyver=${1:-3.12}
rev=${2:-e02e813}
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then py=.venv/bin/python; fi   # has setuptools + wheel
pip=("$py" -m pip -q --disable-pip-version-check)
if [ ! -f .raypkg/ray-trim.tar.xz ]; then
    "${pip[@]}" download --no-deps --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
        -d "$tmp/w" ray==2.60.0
    unzip -q "$tmp"/w/ray-2.60.0-*.whl -d "$tmp/ray_x" && rm -rf "$tmp"/ray_x/ray/{jars,rllib,llm}
    mkdir -p .raypkg && tar -C "$tmp/ray_x" -cf - . | xz -9e -T2 > .raypkg/ray-trim.tar.xz
fi
if ! compgen -G ".whl/jsonschema-*.whl" >/dev/null; then
    "${pip[@]}" download --no-deps --only-binary=:all: --python-version "$pyver" --platform manylinux2014_x86_64 \
        -d .whl jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
fi
if [ ! -d .before/dtop_export ]; then
    mkdir -p "$tmp/src" && git archive "$rev" | tar -x -C "$tmp/src"
    "${pip[@]}" wheel --no-deps --no-build-isolation -w "$tmp/wheel" "$tmp/src"
    "${pip[@]}" install --no-deps --target .before "$tmp"/wheel/*.whl
    rm -rf .before/*.dist-info .before/bin
fi
if [ -n "${TRAINED:-}" ]; then
    mkdir -p .trained && cp "$TRAINED" .trained/model.pt
fi
du -sh .raypkg .whl .before .trained 2>/dev/null || true
