// Uses the installed headers the way a user's program would, and checks one value it can
// compute by hand: a 2x2 matrix product.
#include <tessera/tessera.hpp>

#include <cstdio>

int main() {
  namespace ts = tessera;
  auto a = ts::Tensor<float>::from({2, 2}, {1, 2, 3, 4});
  auto b = ts::Tensor<float>::from({2, 2}, {5, 6, 7, 8});
  auto c = ts::ops::matmul<float>(a, b);
  // [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50]
  const bool ok = c(0, 0) == 19 && c(0, 1) == 22 && c(1, 0) == 43 && c(1, 1) == 50;
  std::printf("%s: %s\n", ok ? "consumer ok" : "consumer WRONG", ts::version_string());
  return ok ? 0 : 1;
}
