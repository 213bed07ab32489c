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

// Attention's core as a LibTorch 1.13 user writes it (1.13 has no scaled_dot_product_attention):
// q (B, T, H, D), k and v (B, T, KV, D) as given (after RoPE), kv heads repeated for grouped
// queries, scores = q k^T / sqrt(D) materialised as (B, H, T, T), masked where key j is not in
// query i's window (j > i or i - j >= window[b * T + i]; a window >= T is full causal),
// softmax, o = P v. The mask is built once, here, as a model registers its causal-mask buffer.
// With `backward`, a run() also calls o.backward(d_o) through autograd (d_o (B, T, H, D)), and
// result() returns {o, dq, dk, dv} in the inputs' layouts; without it {o}.
Bench attention_f32(const float* q, const float* k, const float* v, const float* d_o,
                    const int64_t* window, int64_t batch, int64_t seq, int64_t heads,
                    int64_t kv_heads, int64_t head_dim, bool backward);

}  // namespace torch_side
