#!/usr/bin/env bash
# The README's main command: installs what is missing, builds the demo and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --demo
cmake --preset release -DTESSERA_BUILD_TESTS=OFF -DTESSERA_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build --preset release --target tessera_demo
./build/release/examples/tessera_demo "$@"
