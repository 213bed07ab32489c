// benchmarks/torch_side.hpp — the LibTorch half of tessera_bench, behind a plain interface.
//
// Why a wall: a translation unit that includes <torch/torch.h> takes about 27 s to compile and
// brings LibTorch's own `Tensor`, macros and dialect. So exactly one file (torch_side.cpp)
// includes torch, and the tessera half (tessera_bench.cpp, C++20) talks to it through this
// header, which knows neither library: inputs go in as plain pointers to the caller's buffers
// (LibTorch wraps them with from_blob, no copy), and each op comes back as a `Bench` — a closure
// that runs the op once, the way a LibTorch user writes it, plus a function that copies the
// last result out so the caller can check both sides computed the same thing.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace torch_side {

struct Bench {
  std::function<void()> run;                  // one call of the op (timed)
  // The last call's outputs, each widened to float (cross-entropy has two: loss, dlogits).
  std::function<std::vector<std::vector<float>>()> result;
};

// "LibTorch 1.13.1" plus what LibTorch reports about its build: BLAS, oneDNN (MKLDNN), the
// ATen CPU capability it dispatches to, and its parallel back end.
std::string describe();

// torch::set_num_threads (OpenMP and LibTorch's intra-op pool).
void set_num_threads(int n);
int num_threads();

// c (M, N) = a (M, K) b (K, N), row-major, no transposes: torch::matmul.
Bench matmul_f32(const float* a, const float* b, int64_t m, int64_t k, int64_t n);
// The same on bf16 operands given as raw bf16 bit patterns; the output is bf16.
Bench matmul_bf16(const uint16_t* a, const uint16_t* b, int64_t m, int64_t k, int64_t n);

// y (rows, cols) = softmax over the last axis: torch::softmax(x, -1).
Bench softmax_f32(const float* x, int64_t rows, int64_t cols);

// y (rows, cols) = x * rsqrt(mean(x^2, -1) + eps) * weight (cols). LibTorch 1.13 has no fused
// RMSNorm; this is the expression every LLaMA-style model in PyTorch writes (LlamaRMSNorm).
Bench rmsnorm_f32(const float* x, const float* weight, int64_t rows, int64_t cols, float eps);

// loss = mean over rows of cross_entropy(logits (rows, vocab), targets (rows)), then
// loss.backward(): torch::nn::functional::cross_entropy with autograd. result() returns
// {{loss}, {dlogits (rows * vocab)}}.
Bench cross_entropy_f32(const float* logits, const int64_t* targets, int64_t rows, int64_t vocab);

}  // namespace torch_side
