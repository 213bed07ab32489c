// benchmarks/machine.hpp — what every benchmark program says about the machine, and the
// process set-up they share.
//
// A timing means little without the processor and the load it ran under, so each program
// prints both in its header. restart_with_warm_heap() re-executes the program with glibc
// tunables that keep freed memory in the heap: otherwise every large tensor allocation is a
// fresh mmap whose first-touch page faults land inside the timed calls.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#if defined(__linux__)
#include <unistd.h>
#endif

namespace bench {

inline std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) {
      const auto p = line.find(':');
      return p == std::string::npos ? "unknown" : line.substr(p + 2);
    }
  return "unknown";
}

// "1-min 5-min 15-min" from /proc/loadavg.
inline std::string load_average() {
  std::ifstream in("/proc/loadavg");
  double l1 = 0, l5 = 0, l15 = 0;
  in >> l1 >> l5 >> l15;
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f %.2f %.2f", l1, l5, l15);
  return buf;
}

inline constexpr const char* kWarmHeapMarker = "TESSERA_BENCH_WARM_HEAP";
inline constexpr const char* kWarmHeapTunables =
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:"
    "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0";

// glibc reads its tunables once, at start-up, so the program sets them and starts itself again
// (once: the marker variable says it already did). Why these four: mmap_max = 0 serves every
// block from the heap, trim_threshold keeps freed heap memory, and tcache_count = 0 /
// mxfast = 0 stop the few bytes aligned_alloc splits off behind a block from parking in a
// per-thread cache, where they would keep the freed block from merging back into the heap top;
// the next aligned_alloc of that size then reuses it instead of growing the heap.
// Returns at once when the heap is already warm; otherwise returns only if the exec failed.
inline void restart_with_warm_heap(char** argv, const char* program) {
#if defined(__linux__) && defined(__GLIBC__)
  if (std::getenv(kWarmHeapMarker) != nullptr) return;
  std::string tunables = kWarmHeapTunables;
  if (const char* old = std::getenv("GLIBC_TUNABLES"); old != nullptr && *old != '\0')
    tunables = std::string(old) + ":" + tunables;
  setenv("GLIBC_TUNABLES", tunables.c_str(), 1);
  setenv(kWarmHeapMarker, "1", 1);
  execv("/proc/self/exe", argv);
  unsetenv(kWarmHeapMarker);  // exec failed: carry on with glibc's defaults, and say so
  std::fprintf(stderr, "%s: could not restart with a warm heap; measuring fresh pages\n",
               program);
#else
  (void)argv;
  (void)program;
#endif
}

// s quoted for /bin/sh (the programs start their per-thread-count children through popen).
inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char ch : s) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return q + "'";
}

// The STREAM triad a = b + s·c over three arrays of `bytes_per_array` (two read, one written),
// OpenMP-parallel, best of `passes`, in GB/s: the bandwidth a memory-bound kernel is compared with.
inline double triad_gbs(std::size_t bytes_per_array, int passes) {
  const std::size_t n = bytes_per_array / sizeof(float);
  std::vector<float> a(n), b(n, 1.0f), c(n, 2.0f);
  double best = 0;
  for (int p = 0; p < passes; ++p) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for schedule(static)
    for (std::size_t i = 0; i < n; ++i) a[i] = b[i] + 0.5f * c[i];
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 3.0 * static_cast<double>(n * sizeof(float)) / s / 1e9);
  }
  if (a[n / 2] != 2.0f) std::abort();  // the loop ran (and is not optimised away)
  return best;
}

}  // namespace bench
