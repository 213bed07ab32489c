#!/usr/bin/env bash
# Builds the benchmarks (benchmarks/, docs/performance.md) in the release build directory, next to
# what scripts/test.sh built, and lists them. Run one by hand afterwards, for example
#   OMP_NUM_THREADS=2 build/release/benchmarks/decode_bench
# Timings need an otherwise idle machine; every benchmark prints its peer's figure beside its own.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release -DTESSERA_BUILD_BENCHMARKS=ON -DTESSERA_QUICK_EXAMPLES=OFF
cmake --build --preset release
cmake --build --preset release --target quantize_model
ls build/release/benchmarks | grep -v -e '\.' -e CMakeFiles -e Makefile || true
