#!/usr/bin/env bash
# Issue 31 on a lent GPU machine, in one command (benchmarks/README.md, "Feeding the GPU"):
#   bash benchmarks/gpu_feed.sh OUT_DIR [gpu_feed.py options, e.g. --phases corpus,compiled --budget-s 200]
# Carried from the session's checkout (git-ignored; made by benchmarks/gpu_carry.sh): .raypkg/ray-trim.tar.xz (Ray,
# trimmed to fit the 64 MiB carry), .whl/ (Ray's pure-Python needs the GPU image lacks), .before/ (the dtop_export of
# e02e813, for the before/after), .trained/model.pt (optional: a trained checkpoint for the parity phase). Installs
# dtop-export without touching the machine's torch, then runs benchmarks/gpu_feed.py (every phase within --budget-s,
# default 470 s); results land in OUT_DIR/*.json as each phase ends, the log in OUT_DIR/gpu_feed.log.
set -u
out=${1:?usage: gpu_feed.sh OUT_DIR [gpu_feed.py options]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
t0=$(date +%s)
if [ -f .raypkg/ray-trim.tar.xz ]; then
    mkdir -p /tmp/site && tar -C /tmp/site -xJf .raypkg/ray-trim.tar.xz
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
echo "set-up: $(( $(date +%s) - t0 )) s" | tee "$out/setup.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt"
lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-300 > "$out/cpu.txt"
python3 benchmarks/gpu_feed.py --out "$out" "$@" 2>&1 | tee "$out/gpu_feed.log"
exit "${PIPESTATUS[0]}"
