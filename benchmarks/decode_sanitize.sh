#!/usr/bin/env bash
# The C++ client's decoder (cpp/src/decode*.cpp + image.cpp: decode, turn, resize, normalise) built with ASan and
# UBSan, run on every file of the hostile set (dtop_export.hostile), one process per file. Without OpenVINO: its
# TBB plugin is dlopen'ed with RTLD_DEEPBIND, which the sanitizer runtime refuses, so dtop-embed itself cannot run
# sanitized as is (it can with an LD_PRELOAD shim whose dlopen drops RTLD_DEEPBIND and calls dlsym(RTLD_NEXT, "dlopen"),
# ASAN_OPTIONS=verify_asan_link_order=0, and the cpp/ build configured with -DCMAKE_CXX_FLAGS=-fsanitize=...). Prints the files whose process died of anything but a clean refusal (exit 0 read, 2 refused).
#
#   bash benchmarks/decode_sanitize.sh [--ci] [--budget-mb 64]        (needs g++, libjpeg and zlib headers)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CI=0
BUDGET=64
while [ $# -gt 0 ]; do
  case "$1" in
    --ci) CI=1 ;;
    --budget-mb) BUDGET=$2; shift ;;
    *) echo "usage: $0 [--ci] [--budget-mb N]" >&2; exit 2 ;;
  esac
  shift
done
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cat > "$WORK/main.cpp" <<'EOF'
#include <cstdio>
#include <cstdlib>
#include <dtop/image.hpp>
int main(int argc, char** argv) {
  dtop::DecodeLimits limits;
  limits.max_decode_mb = std::strtoull(argv[2], nullptr, 10);
  try {
    const dtop::Image img = dtop::load_image(argv[1], limits);
    const dtop::Tensor t = dtop::prepare(img, dtop::PreprocessConfig{}, 64);
    return t.data.empty() ? 3 : 0;
  } catch (const dtop::ImageError& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
EOF
g++ -std=c++17 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
  -ffp-contract=off -Icpp/include cpp/src/decode.cpp cpp/src/decode_exif.cpp cpp/src/decode_jpeg.cpp \
  cpp/src/decode_png.cpp cpp/src/image.cpp "$WORK/main.cpp" -ljpeg -lz -o "$WORK/decode"
"$PY" -c "
import sys
from dtop_export.hostile import write_hostile_set
write_hostile_set(sys.argv[1], ci_only=bool(int(sys.argv[2])))" "$WORK/set" "$CI"
export ASAN_OPTIONS=exitcode=99:detect_leaks=1 UBSAN_OPTIONS=exitcode=98:print_stacktrace=1
total=0 read=0 refused=0 bad=0
for f in "$WORK"/set/*; do
  total=$((total + 1))
  rc=0
  "$WORK/decode" "$f" "$BUDGET" 2> "$WORK/err.txt" || rc=$?
  case $rc in
    0) read=$((read + 1)) ;;
    2) refused=$((refused + 1)) ;;
    *) bad=$((bad + 1)); echo "exit $rc: $(basename "$f")"; head -5 "$WORK/err.txt" ;;
  esac
done
echo "$total files: $read read, $refused refused, $bad with a sanitizer report or a crash"
[ "$bad" -eq 0 ]
