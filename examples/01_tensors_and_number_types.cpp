// 01 — Tensors and number types
//
// What you will learn:
//   * a Tensor owns a contiguous, aligned buffer and is moved, never copied by accident;
//   * slices, transposes and reshapes are views: they share the buffer and cost nothing;
//   * mistakes (bad shapes, bad indices) are reported with messages that say what to fix;
//   * bf16, fp16 and FP8 are a few bits with a different split between range (exponent) and
//     precision (mantissa), and conversion rounds to the nearest representable value;
//   * FP8 E4M3 has no infinity: values beyond 448 saturate (the default) or become NaN;
//   * FP8 training therefore scales a tensor into the format's range first. With one scale
//     per 1x128 tile (DeepSeek-V3's recipe) one outlier no longer flattens its whole tensor.
// The program checks every claim it prints and exits non-zero if one is false.
#include <tessera/tessera.hpp>

#include <cmath>
#include <cstdio>
#include <numeric>
#include <sstream>
#include <vector>

namespace ts = tessera;

static int failures = 0;
static void check(bool ok, const char* claim) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", claim);
  failures += ok ? 0 : 1;
}

// Part 1: tensors and views.
static void tensors_and_views() {
  // A (batch, seq, features) activation: 2 sequences of 3 tokens with 4 features each.
  auto x = ts::Tensor<float>::empty({2, 3, 4});
  std::iota(x.data(), x.data() + x.numel(), 0.0f);  // element (b, t, f) = 12b + 4t + f
  std::printf("x = %s\n", (std::ostringstream() << x).str().c_str());

  std::puts("Views share memory:");
  auto second_token = x.select(1, 1);  // (2, 4): token 1 of both sequences
  check(second_token(1, 2) == 12 + 4 + 2, "select(1, 1) picks token 1 of every sequence");
  second_token(0, 0) = -1.0f;
  check(x(0, 1, 0) == -1.0f, "writing through a view writes into the tensor");

  auto features_first = x.transpose(1, 2);  // (2, 4, 3)
  check(features_first(1, 3, 2) == x(1, 2, 3), "transpose swaps axes without moving data");
  check(!features_first.is_contiguous(), "a transposed view is strided, not contiguous");

  auto rows = x.reshape({-1, 4});  // (6, 4): every token as a row
  check(rows.shape() == ts::Shape({6, 4}), "reshape({-1, 4}) infers 6 rows");

  std::puts("Copies are explicit:");
  auto copy = x.clone();
  copy(0, 0, 0) = 100.0f;
  check(x(0, 0, 0) == 0.0f, "clone() is an independent copy");
  auto dense = features_first.contiguous();
  check(dense.reshape({-1}).numel() == 24, "contiguous() materialises a strided view");

  std::puts("Mistakes are explained:");
  try {
    (void)features_first.reshape({24});
    check(false, "reshaping a strided view throws");
  } catch (const ts::Error& e) {
    std::printf("    tessera::Error: %s\n", e.what());
    check(true, "reshaping a strided view throws instead of copying behind your back");
  }
  try {
    (void)x(2, 0, 0);
    check(false, "out-of-bounds index throws");
  } catch (const ts::Error& e) {
    std::printf("    tessera::Error: %s\n", e.what());
    check(true, "an out-of-bounds index names the axis and the shape");
  }
}

template <class T>
static void show(float x) {
  const T q(x);
  std::printf("  %-9s %-10g -> bits 0x%0*x -> %.8g\n", ts::number_traits<T>::name, x,
              static_cast<int>(sizeof(T) * 2), static_cast<unsigned>(q.bits),
              static_cast<float>(q));
}

// Part 2: what bf16, fp16 and FP8 keep of a float.
static void number_types() {
  std::puts("pi in each format (bits, and the value they decode to):");
  show<ts::bf16>(3.14159265f);
  show<ts::fp16>(3.14159265f);
  show<ts::fp8_e4m3>(3.14159265f);
  show<ts::fp8_e5m2>(3.14159265f);
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
}

int main() {
  tensors_and_views();
  number_types();
  std::printf("%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
