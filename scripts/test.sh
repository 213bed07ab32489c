#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything and runs every test.
# CTest's last line is its summary ("100% tests passed, 0 tests failed out of N").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release -DTESSERA_BUILD_TESTS=ON -DTESSERA_BUILD_EXAMPLES=ON -DTESSERA_BUILD_BENCHMARKS=ON
cmake --build --preset release
ctest --preset release "$@"
