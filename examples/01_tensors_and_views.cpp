// 01 — Tensors and views
//
// What you will learn:
//   * a Tensor owns a contiguous, aligned buffer and is moved, never copied by accident;
//   * slices, transposes and reshapes are views: they share the buffer and cost nothing;
//   * mistakes (bad shapes, bad indices) are reported with messages that say what to fix.
// The program checks every claim it prints and exits non-zero if one is false.
#include <tessera/tessera.hpp>

#include <cstdio>
#include <numeric>
#include <sstream>

namespace ts = tessera;

static int failures = 0;
static void check(bool ok, const char* claim) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", claim);
  failures += ok ? 0 : 1;
}

int main() {
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
  std::printf("%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
