// benchmarks/qgemm_bench.cpp — quantised weight products (tessera/quant/qgemm.hpp) against the
// memory bandwidth they are bound by (docs/quantization.md).
//
// For the products of SmolLM2-135M (K = 576: q/o 576x576, k/v 192x576, gate/up 1536x576, the
// LM head 49152x576; and down 576x1536) and M = 1, 4, 16, 32 rows, it times one call of
//   fp32 via ops::linear (OpenBLAS/oneDNN), and tessera's kernels on fp32, bf16, fp8_e4m3,
//   int4_rtn<32> and int4_awq<64>; the INT4 formats once on the float-unpacking AVX-512 path
//   ("/avx512") and once on the int8-activation VNNI path ("/vnni"), where the CPU has both
// and prints the weight bytes read per second next to a measured read bandwidth.
//
// Decoding reads each matrix once per token, and a model's weights do not fit in the cache, so
// the figure that matters is the product with W coming from DRAM. The program therefore rotates
// over enough copies of each quantised matrix to exceed twice the last-level cache ("dram"
// columns); the "hot" column repeats one matrix (cache-resident when it fits).
// AWQ uses groups of 64 here (576 is not a multiple of 128); groups of 128 where K allows (down).
//
//   build-quant/benchmarks/qgemm_bench [--threads 2] [--repeat 15] [--filter head]
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <immintrin.h>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "harness.hpp"
#include "machine.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/quant/qgemm.hpp"

namespace {

using namespace tessera;

constexpr std::int64_t kMaxRows = 32;

struct Options {
  int threads = 2;
  int repeat = 15;
  std::string filter;
};

// Wall time of a call, and the CPU time of all the process's threads during it.
double process_cpu_seconds() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

// Median and fastest wall time of `repeat` calls, and the fastest CPU time per thread.
// Why three: this machine has 2 cores shared with other people's compilers. A call whose
// threads get descheduled takes several times longer on the wall clock, so the median mostly
// measures the load. The fastest wall time is a call that ran (nearly) alone. CPU time per
// thread counts only the time the threads actually ran, stalls on memory included, so it
// estimates the wall time of an unloaded machine even for long calls that never run alone
// (idle OpenMP threads must sleep for this: the program sets OMP_WAIT_POLICY=passive).
struct Times {
  double median_s = 0;
  double best_s = 0;
  double cpu_s = 0;
};
Times time_calls(const std::function<void()>& f, int repeat, int threads) {
  f();
  std::vector<double> t;
  double cpu = 1e30;
  for (int i = 0; i < repeat; ++i) {
    const double c0 = process_cpu_seconds();
    t.push_back(bench::seconds_of(f));
    cpu = std::min(cpu, (process_cpu_seconds() - c0) / threads);
  }
  return {bench::median(t), *std::min_element(t.begin(), t.end()), cpu};
}

std::size_t last_level_cache_bytes() {
  long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return l3 > 0 ? static_cast<std::size_t>(l3) : std::size_t{64} << 20;
}

// Read bandwidth: the threads sum a large buffer with 64-byte loads (AVX-512, or AVX2), 64 MiB
// at a time, each slice timed alone. The buffer is four times the last-level cache, so every
// slice comes from DRAM. Reported: the fastest slice (wall) and the fastest by CPU time per
// thread, the counterparts of the product's two columns.
// (GCC 12 warns about the don't-care vectors inside _mm512_reduce_add_ps; see quant/qgemm.hpp.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
__attribute__((target("avx512f"))) float sum_slice_avx512(const float* p, std::size_t n) {
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
    for (std::size_t i = 0; i < n; i += 64) {
      a0 = _mm512_add_ps(a0, _mm512_load_ps(p + i));
      a1 = _mm512_add_ps(a1, _mm512_load_ps(p + i + 16));
      a2 = _mm512_add_ps(a2, _mm512_load_ps(p + i + 32));
      a3 = _mm512_add_ps(a3, _mm512_load_ps(p + i + 48));
    }
    total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  }
  return total;
}
__attribute__((target("avx2"))) float sum_slice_avx2(const float* p, std::size_t n) {
  float total = 0;
#pragma omp parallel reduction(+ : total)
  {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
    for (std::size_t i = 0; i < n; i += 32) {
      a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
      a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
      a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
      a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
    }
    alignas(32) float v[8];
    _mm256_store_ps(v, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (float e : v) total += e;
  }
  return total;
}

#pragma GCC diagnostic pop

struct Bandwidth {
  double wall_gbs = 0;
  double cpu_gbs = 0;
};
Bandwidth read_bandwidth(std::size_t bytes, int passes, int threads) {
  const std::size_t n = bytes / 4, slice = (std::size_t{64} << 20) / 4;
  float* buf = static_cast<float*>(std::aligned_alloc(64, n * 4));
#pragma omp parallel for schedule(static)
  for (std::size_t i = 0; i < n; ++i) buf[i] = 1.0f;
  const bool wide = cpu_features().avx512f;
  Bandwidth best;
  volatile float sink = 0;
  for (int p = 0; p < passes; ++p)
    for (std::size_t s0 = 0; s0 + slice <= n; s0 += slice) {
      const double c0 = process_cpu_seconds();
      const auto t0 = std::chrono::steady_clock::now();
      sink = sink + (wide ? sum_slice_avx512(buf + s0, slice) : sum_slice_avx2(buf + s0, slice));
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double c = (process_cpu_seconds() - c0) / threads;
      best.wall_gbs = std::max(best.wall_gbs, static_cast<double>(slice * 4) / t / 1e9);
      best.cpu_gbs = std::max(best.cpu_gbs, static_cast<double>(slice * 4) / c / 1e9);
    }
  std::free(buf);
  return best;
}

struct Shape2 {
  const char* name;
  std::int64_t n, k;
};

Tensor<float> random_matrix(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 0.02f);
  auto t = Tensor<float>::empty(Shape{rows, cols});
  for (float& v : t.span()) v = g(rng);
  return t;
}

// Activations with a few large channels, as transformer activations have.
Tensor<float> activations(std::int64_t rows, std::int64_t cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g(0.0f, 1.0f);
  auto t = Tensor<float>::empty(Shape{rows, cols});
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) t(r, c) = g(rng) * (c % 97 == 3 ? 20.0f : 1.0f);
  return t;
}

void print_row(const char* shape, const char* format, std::int64_t m, Times hot, Times dram,
               std::size_t bytes, const Bandwidth& bw) {
  const double gbs = static_cast<double>(bytes) / dram.best_s / 1e9;
  const double gbs_cpu = static_cast<double>(bytes) / dram.cpu_s / 1e9;
  std::printf("%-8s %-20s %3lld %8.1f %8.1f %8.1f %8.1f %9.1f %7.2f %6.1f %4.0f%% %6.1f %4.0f%%\n",
              shape, format, static_cast<long long>(m), hot.best_s * 1e6, hot.median_s * 1e6,
              dram.best_s * 1e6, dram.median_s * 1e6, dram.cpu_s * 1e6,
              static_cast<double>(bytes) / 1e6, gbs, 100.0 * gbs / bw.wall_gbs, gbs_cpu,
              100.0 * gbs_cpu / bw.cpu_gbs);
  std::fflush(stdout);
}

template <class F>
void run_format(const Shape2& s, const Tensor<float>& w, const Tensor<float>& xs,
                const Options& opt, const Bandwidth& bw) {
  quant::Calibration cal{activations(8, s.k, 99)};
  const auto q = quant::quantize<F>(w, &cal);
  const std::size_t llc = last_level_cache_bytes();
  const std::size_t copies = std::max<std::size_t>(2, 2 * llc / q.bytes() + 1);
  std::vector<quant::QuantizedMatrix<F>> many(copies, q);
  std::vector<float> y(static_cast<std::size_t>(kMaxRows * s.n));
  // INT4: the float path and the VNNI path side by side; other formats: the default path.
  std::vector<quant::KernelPath> paths{quant::kernel_path()};
  if (quant::is_int4_v<F> && quant::path_available(quant::KernelPath::kAvx512Vnni))
    paths = {quant::KernelPath::kAvx512, quant::KernelPath::kAvx512Vnni};
  for (const quant::KernelPath path : paths)
    for (std::int64_t m : {1, 4, 16, 32}) {
      const Times hot = time_calls(
          [&] { quant::matmul_via(path, xs.data(), m, s.k, q, y.data(), s.n); }, opt.repeat,
          opt.threads);
      std::size_t next = 0;
      const Times dram = time_calls(
          [&] {
            quant::matmul_via(path, xs.data(), m, s.k, many[next], y.data(), s.n);
            next = (next + 1) % copies;
          },
          std::max<int>(opt.repeat, 3 * static_cast<int>(std::min<std::size_t>(copies, 20))),
          opt.threads);
      // (snprintf, not std::string +=: GCC 12 warns falsely about the latter at -O3.)
      char name[48];
      if constexpr (quant::is_int4_v<F>) {
        std::snprintf(name, sizeof name, "%s<%d>%s", F::kName, F::kGroup,
                      paths.size() < 2 ? ""
                      : path == quant::KernelPath::kAvx512Vnni ? "/vnni"
                                                              : "/avx512");
      } else {
        std::snprintf(name, sizeof name, "%s", F::kName);
      }
      print_row(s.name, name, m, hot, dram, q.bytes(), bw);
    }
}

void run_fp32_linear(const Shape2& s, const Tensor<float>& w, const Tensor<float>& xs,
                     const Options& opt, const Bandwidth& bw) {
  const std::size_t bytes = static_cast<std::size_t>(s.n * s.k) * 4;
  const std::size_t copies = std::max<std::size_t>(2, 2 * last_level_cache_bytes() / bytes + 1);
  std::vector<Tensor<float>> many;
  for (std::size_t i = 0; i < copies; ++i) many.push_back(w.clone());
  for (std::int64_t m : {1, 4, 16, 32}) {
    const auto x = xs.slice(0, 0, m);
    const Times hot = time_calls([&] { auto y = ops::linear<float>(x, w); }, opt.repeat, opt.threads);
    std::size_t next = 0;
    const Times dram = time_calls(
        [&] {
          auto y = ops::linear<float>(x, many[next]);
          next = (next + 1) % copies;
        },
        std::max<int>(opt.repeat, 3 * static_cast<int>(std::min<std::size_t>(copies, 20))),
        opt.threads);
    print_row(s.name, "fp32 ops::lin", m, hot, dram, bytes, bw);
  }
}

}  // namespace

int main(int argc, char** argv) {
  setenv("OMP_WAIT_POLICY", "passive", 0);  // read at start-up: the restart below passes it on
  bench::restart_with_warm_heap(argv, "qgemm_bench");
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) {
      opt.threads = std::atoi(argv[++i]);
    } else if (a == "--repeat" && i + 1 < argc) {
      opt.repeat = std::atoi(argv[++i]);
    } else if (a == "--filter" && i + 1 < argc) {
      opt.filter = argv[++i];
    } else {
      std::fprintf(stderr, "usage: qgemm_bench [--threads N] [--repeat R] [--filter SHAPE]\n");
      return 2;
    }
  }
  omp_set_num_threads(opt.threads);
  std::printf("qgemm_bench: %s; %s; threads %d; load %s; kernel path %s; LLC %zu MiB\n",
              bench::cpu_model().c_str(), cpu_features().str().c_str(), opt.threads,
              bench::load_average().c_str(), quant::to_string(quant::kernel_path()),
              last_level_cache_bytes() >> 20);
  const std::size_t big = std::max<std::size_t>(std::size_t{1} << 30, 4 * last_level_cache_bytes());
  const Bandwidth bw = read_bandwidth(big, 3, opt.threads);
  const double triad = bench::triad_gbs(big / 3, 3);
  std::printf("read bandwidth %.1f GB/s by wall time, %.1f GB/s by CPU time per thread (fastest "
              "64 MiB slice of a %zu MiB sum, 3 passes); triad %.1f GB/s (best of 3 passes)\n",
              bw.wall_gbs, bw.cpu_gbs, big >> 20, triad);
  std::printf("%-8s %-20s %3s %8s %8s %8s %8s %9s %7s %6s %5s %6s %5s\n", "shape", "format", "M",
              "hot min", "hot med", "dram min", "dram med", "dram cpu", "W MB", "GB/s", "of bw",
              "GB/s c", "of bw");
  std::printf("(us per call; GB/s = weight bytes / dram min, GB/s c = bytes / dram cpu, each "
              "against the matching bandwidth)\n");
  const Shape2 shapes[] = {{"kv", 192, 576},     {"qo", 576, 576},   {"gate_up", 1536, 576},
                           {"down", 576, 1536},  {"head", 49152, 576}};
  for (const Shape2& s : shapes) {
    if (!opt.filter.empty() && opt.filter != s.name) continue;
    const Tensor<float> w = random_matrix(s.n, s.k, 7);
    const Tensor<float> xs = activations(kMaxRows, s.k, 11);
    run_format<quant::FP32Weights>(s, w, xs, opt, bw);
    run_format<quant::BF16Weights>(s, w, xs, opt, bw);
    run_format<quant::FP8Weights>(s, w, xs, opt, bw);
    run_format<quant::Int4RTN<32>>(s, w, xs, opt, bw);
    run_format<quant::Int4AWQ<64>>(s, w, xs, opt, bw);
    if (s.k % 128 == 0) run_format<quant::Int4AWQ<128>>(s, w, xs, opt, bw);
    // Last, and followed by a pause: OpenBLAS's worker threads spin for a while after a call,
    // and on two cores they would take the CPU from the next rows' OpenMP threads.
    run_fp32_linear(s, w, xs, opt, bw);
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  return 0;
}
