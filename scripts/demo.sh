#!/usr/bin/env bash
# The README's main command: installs what is missing, builds the flagship trainer and runs it
# (trains a small DeepSeek-R1-style model on real Chinese and English text; docs/training.md).
# Arguments go to train_r1, e.g. `scripts/demo.sh --steps 100` or `scripts/demo.sh --resume`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --demo
cmake --preset release -DTESSERA_BUILD_TESTS=OFF -DTESSERA_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build --preset release --target train_r1
# Two threads that sleep while they wait: spinning threads crawl when anything else runs.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
./build/release/examples/train_r1 --run-dir build/release/train_r1_run "$@"
