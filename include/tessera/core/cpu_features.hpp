// tessera/core/cpu_features.hpp — what this processor can do, asked once at run time.
//
// tessera is header-only and built with the compiler's baseline flags, so the fast paths
// (OpenBLAS's AVX-512 kernels, oneDNN's bf16 and AMX kernels) are picked at run time from
// CPUID rather than at compile time: the same binary runs on an old laptop and on a
// Sapphire Rapids server, and takes the best path on each.
//
// Two things besides the CPUID bit must hold before a feature counts as present:
//   - the OS must save the wider register state on context switches (XCR0, read with
//     xgetbv): AVX needs the YMM bits, AVX-512 the opmask/ZMM bits, AMX the tile bits;
//   - AMX additionally needs a per-process permission on Linux
//     (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), requested here once.
// The answer is cached in a function-local static (thread-safe initialisation).
//
// TESSERA_CPU_PATH=scalar|eigen|openblas|onednn forces the back end of the matrix products
// (tests run every path the machine can run; users can rule out a misbehaving library). It
// is read on every call, so a test may set it with setenv between calls.
#pragma once

#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "tessera/core/error.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define TESSERA_DETAIL_X86 1
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace tessera {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512_bf16 = false;
  bool avx512_vnni = false;
  bool avx512_fp16 = false;
  bool amx_tile = false;  // CPUID, XCR0 and (Linux) the arch_prctl permission all agree
  bool amx_bf16 = false;

  // "avx2 fma avx512f ..." (the features present, space separated) or "baseline".
  std::string str() const {
    std::string s;
    auto add = [&s](bool on, const char* name) {
      if (!on) return;
      if (!s.empty()) s.push_back(' ');
      s.append(name);
    };
    add(avx2, "avx2");
    add(fma, "fma");
    add(avx512f, "avx512f");
    add(avx512bw, "avx512bw");
    add(avx512_bf16, "avx512_bf16");
    add(avx512_vnni, "avx512_vnni");
    add(avx512_fp16, "avx512_fp16");
    add(amx_tile, "amx_tile");
    add(amx_bf16, "amx_bf16");
    return s.empty() ? "baseline" : s;
  }
};

namespace detail {

#if defined(TESSERA_DETAIL_X86)
inline unsigned long long read_xcr0() {
  unsigned int eax = 0, edx = 0;
  // xgetbv by opcode, so no -mxsave flag is needed to compile this header.
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux keeps AMX tile data off until a process asks; without the permission the first
// tile instruction faults. Returns true when the permission is (already) granted.
inline bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchGetXcompPerm = 0x1022;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
  return (bitmask & (1ull << kXfeatureXtiledata)) != 0;
#else
  return true;  // other systems enable the state through XCR0 alone
#endif
}
#endif

inline CpuFeatures detect_cpu_features() {
  CpuFeatures f;
#if defined(TESSERA_DETAIL_X86)
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return f;
  const unsigned int max_leaf = eax;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1;
  const bool avx = (ecx >> 28) & 1;
  const bool fma = (ecx >> 12) & 1;
  if (!osxsave || !avx || max_leaf < 7) return f;
  const unsigned long long xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;         // XMM and YMM state
  const bool os_avx512 = (xcr0 & 0xE6) == 0xE6;    // + opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & 0x60000) == 0x60000; // XTILECFG and XTILEDATA
  if (!os_avx) return f;

  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const unsigned int l7_ebx = ebx, l7_ecx = ecx, l7_edx = edx, l7_max_sub = eax;
  f.fma = fma;
  f.avx2 = (l7_ebx >> 5) & 1;
  if (os_avx512) {
    f.avx512f = (l7_ebx >> 16) & 1;
    f.avx512bw = f.avx512f && ((l7_ebx >> 30) & 1);
    f.avx512_vnni = f.avx512f && ((l7_ecx >> 11) & 1);
    f.avx512_fp16 = f.avx512f && ((l7_edx >> 23) & 1);
    if (l7_max_sub >= 1) {
      __cpuid_count(7, 1, eax, ebx, ecx, edx);
      f.avx512_bf16 = f.avx512f && ((eax >> 5) & 1);
    }
  }
  const bool cpu_amx_tile = (l7_edx >> 24) & 1;
  const bool cpu_amx_bf16 = (l7_edx >> 22) & 1;
  if (cpu_amx_tile && os_amx && request_amx_permission()) {
    f.amx_tile = true;
    f.amx_bf16 = cpu_amx_bf16;
  }
#endif
  return f;
}

}  // namespace detail

// The features of the processor this process runs on, detected on first use.
inline const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detail::detect_cpu_features();
  return features;
}

// One line for logs and test output: the features and the compiled-in back ends.
inline std::string cpu_features_summary() {
  std::string s = "cpu: " + cpu_features().str() + "; back ends: scalar eigen";
#if defined(TESSERA_HAVE_OPENBLAS)
  s += " openblas";
#endif
#if defined(TESSERA_HAVE_DNNL)
  s += " onednn";
#endif
  return s;
}

// The CPU back ends a matrix product can run on (see tessera/ops/matmul.hpp for which
// types each one takes).
enum class CpuPath { kScalar, kEigen, kOpenBlas, kOneDnn };

inline const char* to_string(CpuPath p) {
  switch (p) {
    case CpuPath::kScalar: return "scalar";
    case CpuPath::kEigen: return "eigen";
    case CpuPath::kOpenBlas: return "openblas";
    case CpuPath::kOneDnn: return "onednn";
  }
  return "?";
}

// Parses a path name; throws tessera::Error listing the accepted names otherwise.
inline CpuPath parse_cpu_path(std::string_view name) {
  if (name == "scalar") return CpuPath::kScalar;
  if (name == "eigen") return CpuPath::kEigen;
  if (name == "openblas") return CpuPath::kOpenBlas;
  if (name == "onednn") return CpuPath::kOneDnn;
  fail("CPU path '", name, "' is unknown; expected one of scalar, eigen, openblas, onednn");
}

// The path forced by the environment variable TESSERA_CPU_PATH, or nothing when it is unset
// or empty. An unknown value throws (a typo must not silently fall back to the default).
inline std::optional<CpuPath> cpu_path_override() {
  const char* v = std::getenv("TESSERA_CPU_PATH");
  if (v == nullptr || *v == '\0') return std::nullopt;
  try {
    return parse_cpu_path(v);
  } catch (const Error& e) {
    fail("TESSERA_CPU_PATH: ", e.what());
  }
}

}  // namespace tessera
