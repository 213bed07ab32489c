#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything and runs every test.
# The last line is CTest's summary ("100% tests passed, 0 tests failed out of N").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset release -DTESSERA_BUILD_TESTS=ON -DTESSERA_BUILD_EXAMPLES=ON -DTESSERA_BUILD_BENCHMARKS=ON
cmake --build --preset release
# CTest prints its label times and the list of skipped tests after the summary; say the
# summary again so that it is the last line.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
ctest --preset release "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E '^[0-9]+% tests passed' "$log" | tail -1)
echo
echo "${summary:-ctest printed no summary (exit status $rc)}"
exit "$rc"
