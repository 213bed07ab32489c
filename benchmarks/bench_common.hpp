// benchmarks/bench_common.hpp — what the programs that time tessera next to LibTorch
// (tessera_bench, attention_bench, block_bench) share beyond harness.hpp and machine.hpp.
//
// They read their command lines the same way, give OpenMP, OpenBLAS and LibTorch one thread
// count, print the same machine lines, and (tessera_bench, block_bench) measure each thread count
// in a child process of their own. attention_bench and block_bench also share the slow-call
// timing here (`alternate`); tessera_bench's many short calls use harness.hpp's time_pair.
// Includes torch_side.hpp, so only a program linked with tessera_bench_torch can use it.
#pragma once

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "harness.hpp"
#include "machine.hpp"
#include "tessera/core/cpu_features.hpp"
#include "torch_side.hpp"

#if defined(TESSERA_HAVE_OPENBLAS)
#include <cblas.h>
#endif

namespace bench {

// ---- command line ------------------------------------------------------------------------------

// A command line read flag by flag. A bad value ends the program with exit code 2 after
// "<program>: <error>" and the usage on stderr.
class Args {
 public:
  // `synopsis` is the usage text after "usage: <argv[0]>", the flags and what they mean.
  Args(int argc, char** argv, const char* program, const char* synopsis)
      : argc_(argc), argv_(argv), program_(program), synopsis_(synopsis) {}

  // Steps to the next flag; false after the last one.
  bool next() {
    if (i_ + 1 >= argc_) return false;
    flag_ = argv_[++i_];
    return true;
  }
  const std::string& flag() const { return flag_; }

  // The argument after the flag.
  std::string value() {
    if (i_ + 1 >= argc_) fail(flag_ + " needs a value");
    return argv_[++i_];
  }

  // The value as an integer in [1, max].
  int64_t positive(int64_t max = std::numeric_limits<int64_t>::max()) {
    const std::string v = value();
    char* end = nullptr;
    const long long n = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || n < 1 || n > max)
      fail(flag_ + " wants a positive integer, got '" + v + "'");
    return n;
  }

  // The value as seconds in [0, max]; NaN is refused too.
  double seconds(double max) {
    const std::string v = value();
    char* end = nullptr;
    const double s = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !(s >= 0 && s <= max)) {
      char range[64];
      std::snprintf(range, sizeof range, "[0, %g]", max);
      fail(flag_ + " wants seconds in " + range + ", got '" + v + "'");
    }
    return s;
  }

  // The value as comma-separated thread counts such as 1,2, each in [1, 1024].
  std::vector<int> thread_counts() {
    const std::string v = value();
    std::vector<int> counts;
    std::stringstream in(v);
    std::string item;
    while (std::getline(in, item, ',')) {
      char* end = nullptr;
      const long t = std::strtol(item.c_str(), &end, 10);
      if (item.empty() || *end != '\0' || t < 1 || t > 1024)
        fail(flag_ + " wants positive integers such as 1,2; got '" + v + "'");
      counts.push_back(static_cast<int>(t));
    }
    if (counts.empty()) fail(flag_ + " wants at least one thread count");
    return counts;
  }

  [[noreturn]] void unknown() const { fail("unknown argument '" + flag_ + "'"); }

  [[noreturn]] void fail(const std::string& error) const { usage(error); }

  // Prints the error, if any, and the usage on stderr; exits 0 without an error (--help), else 2.
  [[noreturn]] void usage(const std::string& error = "") const {
    if (!error.empty()) std::fprintf(stderr, "%s: %s\n", program_, error.c_str());
    std::fprintf(stderr, "usage: %s%s", argv_[0], synopsis_);
    std::exit(error.empty() ? 0 : 2);
  }

 private:
  int argc_;
  char** argv_;
  const char* program_;
  const char* synopsis_;
  int i_ = 0;
  std::string flag_;
};

// ---- the process -------------------------------------------------------------------------------

// One thread count for OpenMP (tessera), LibTorch and OpenBLAS, whose pthread pool is sized apart
// from OpenMP's and serves both sides (LibTorch reaches it through libblas.so.3).
inline void set_threads(int n) {
  omp_set_num_threads(n);
  torch_side::set_num_threads(n);
#if defined(TESSERA_HAVE_OPENBLAS)
  openblas_set_num_threads(n);
#endif
}

// Restarts the program with a warm heap (machine.hpp) unless --fresh-pages asked for glibc's
// defaults; true when the heap is warm.
inline bool use_warm_heap(char** argv, const char* program, bool fresh_pages) {
  if (fresh_pages) return false;
  restart_with_warm_heap(argv, program);
  return std::getenv(kWarmHeapMarker) != nullptr;
}

// The short form of the header's memory line.
inline const char* heap_note(bool warm_heap) {
  return warm_heap ? "warm heap (freed memory is reused)" : "fresh pages (glibc defaults)";
}

// The header's lines on the processor, its load, tessera's back ends and OpenBLAS's build.
inline void print_machine() {
  std::printf("machine : %s, %d logical CPUs, load average %s at start\n", cpu_model().c_str(),
              omp_get_num_procs(), load_average().c_str());
  std::printf("tessera : %s\n", tessera::cpu_features_summary().c_str());
#if defined(TESSERA_HAVE_OPENBLAS)
  std::printf("OpenBLAS: %s (core %s)\n", openblas_get_config(), openblas_get_corename());
#endif
}

// This program's executable, for the shell that popen starts (which would read /proc/self/exe
// as itself); "" after saying why on stderr.
inline std::string own_executable(const char* program) {
  std::error_code ec;
  const std::string self = std::filesystem::read_symlink("/proc/self/exe", ec).string();
  if (ec) {
    std::fprintf(stderr, "%s: cannot find its own executable: %s\n", program,
                 ec.message().c_str());
    return {};
  }
  return self;
}

// The shell command that starts the child measuring at `threads` threads, before the program's
// own flags. The thread counts go in the environment too: OpenMP and OpenBLAS size their pools
// from it when first used.
inline std::string child_command(const std::string& self, int threads) {
  const std::string t = std::to_string(threads);
  return "OMP_NUM_THREADS=" + t + " OPENBLAS_NUM_THREADS=" + t + " " + shell_quote(self) +
         " --child --threads " + t;
}

// ---- slow calls: settle, then alternate --------------------------------------------------------

struct Stat {
  double median = NAN, min = NAN;
};

inline Stat stat_of(const std::vector<double>& v) {
  if (v.empty()) return {};
  return {median(v), *std::min_element(v.begin(), v.end())};
}

// One warm-up call per side, then `repeat` rounds of (a, b); b may be empty. Every timed call
// starts after a pause of `settle` seconds: after a product OpenBLAS's worker threads keep
// spinning for up to 2^28 cycles (its default thread timeout, about 0.1 s here), and on 2 cores
// they would compete with whichever call comes next.
inline std::pair<Stat, Stat> alternate(const std::function<void()>& a,
                                       const std::function<void()>& b, int repeat, double settle) {
  const auto pause = [settle] {
    std::this_thread::sleep_for(std::chrono::duration<double>(settle));
  };
  a();
  if (b) b();
  std::vector<double> ta, tb;
  for (int r = 0; r < repeat; ++r) {
    pause();
    ta.push_back(seconds_of(a));
    if (b) {
      pause();
      tb.push_back(seconds_of(b));
    }
  }
  return {stat_of(ta), stat_of(tb)};
}

}  // namespace bench
