// 02 — Number formats: what bf16, fp16 and FP8 keep of a float
//
// What you will learn:
//   * each low-precision type is a few bits with a different split between range (exponent)
//     and precision (mantissa), and conversion rounds to the nearest representable value;
//   * FP8 E4M3 has no infinity: values beyond 448 saturate (the default) or become NaN;
//   * FP8 training therefore scales a tensor into the format's range first. With one scale
//     per 1x128 tile (DeepSeek-V3's recipe) one outlier no longer flattens its whole tensor.
// The program checks every claim it prints and exits non-zero if one is false.
#include <tessera/tessera.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

namespace ts = tessera;

static int failures = 0;
static void check(bool ok, const char* claim) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", claim);
  failures += ok ? 0 : 1;
}

template <class T>
static void show(float x) {
  const T q(x);
  std::printf("  %-9s %-10g -> bits 0x%0*x -> %.8g\n", ts::number_traits<T>::name, x,
              static_cast<int>(sizeof(T) * 2), static_cast<unsigned>(q.bits),
              static_cast<float>(q));
}

int main() {
  std::puts("pi in each format (bits, and the value they decode to):");
  for (float x : {3.14159265f}) {
    show<ts::bf16>(x);
    show<ts::fp16>(x);
    show<ts::fp8_e4m3>(x);
    show<ts::fp8_e5m2>(x);
  }
  check(static_cast<float>(ts::bf16(3.14159265f)) == 3.140625f, "bf16 keeps 8 significant bits");
  check(static_cast<float>(ts::fp8_e4m3(3.14159265f)) == 3.25f, "E4M3 keeps 4 significant bits");

  std::puts("Round to nearest even:");
  // 1 + 2^-8 lies exactly between the bf16 values 1 and 1 + 2^-7: ties go to the even one.
  check(static_cast<float>(ts::bf16(1.0f + 0x1p-8f)) == 1.0f, "bf16(1 + 2^-8) ties to 1");
  check(static_cast<float>(ts::bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f,
        "bf16(1 + 3*2^-8) ties up to 1 + 2^-6 (the even neighbour)");

  std::puts("FP8 E4M3 saturates:");
  check(static_cast<float>(ts::fp8_e4m3(1000.0f)) == 448.0f, "1000 saturates to 448");
  check(std::isnan(static_cast<float>(
            ts::fp8_e4m3::from_float(1000.0f, ts::Fp8Saturation::kNone))),
        "without saturation, 1000 becomes NaN (E4M3 has no infinity)");
  check(std::isinf(static_cast<float>(ts::fp8_e5m2::from_float(1e6f, ts::Fp8Saturation::kNone))),
        "E5M2 has infinities");

  std::puts("Why scales matter: one row of small activations plus a single outlier.");
  std::vector<float> row(256);
  for (int i = 0; i < 256; ++i) row[i] = 0.001f * std::sin(0.1f * i);
  row[200] = 300.0f;  // the outlier, in the second 128-wide tile
  auto error_of = [&](const std::vector<float>& back) {
    double err = 0;
    for (int i = 0; i < 128; ++i) err += std::fabs(back[i] - row[i]);
    return err / 128;  // mean error over the first tile, which has no outlier
  };
  // One scale for the whole row, set by the outlier.
  const float amax = ts::amax(row.data(), static_cast<std::int64_t>(row.size()));
  const float scale = ts::scale_from_amax<ts::fp8_e4m3>(amax);
  std::vector<ts::fp8_e4m3> q(row.size());
  std::vector<float> back(row.size());
  ts::quantize_per_tensor(row.data(), static_cast<std::int64_t>(row.size()), scale, q.data());
  ts::dequantize_per_tensor(q.data(), static_cast<std::int64_t>(row.size()), scale, back.data());
  const double per_tensor = error_of(back);
  // One scale per 1x128 tile: the first tile gets its own, small amax.
  std::vector<float> tile_scales(2);
  ts::quantize_tiles_1x128(row.data(), 1, 256, q.data(), tile_scales.data());
  ts::dequantize_tiles_1x128(q.data(), tile_scales.data(), 1, 256, back.data());
  const double per_tile = error_of(back);
  std::printf("  mean |error| on the outlier-free tile: per-tensor scale %.2e, per-tile %.2e\n",
              per_tensor, per_tile);
  check(per_tile * 10 < per_tensor, "tile scaling is over 10x more accurate away from the outlier");

  std::printf("%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
