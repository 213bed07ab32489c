#!/usr/bin/env bash
# The README's test command: installs what is missing, builds everything and runs every test.
# The last line is CTest's summary ("100% tests passed, 0 tests failed out of N").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
# The benchmarks are not part of the test run: they are timing programs, not pass/fail checks,
# and building them costs about 3 of the 20 minutes this command may take on two cores.
# scripts/bench.sh builds them (same build directory).
# The examples are smoke-run by CTest: most compile at -O1 here (examples/CMakeLists.txt says
# which and why); scripts/bench.sh builds them at full optimisation again.
cmake --preset release -DTESSERA_BUILD_TESTS=ON -DTESSERA_BUILD_EXAMPLES=ON -DTESSERA_BUILD_BENCHMARKS=OFF \
      -DTESSERA_QUICK_EXAMPLES=ON
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
