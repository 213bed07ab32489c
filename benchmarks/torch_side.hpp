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

namespace torch_side {

// One pre-norm decoder block's weights, as plain pointers into the caller's buffers (row-major,
// matrices (out, in) as nn.Linear stores them). Dense blocks set w_gate/w_up/w_down; MoE blocks
// set router (experts, d_model) and one {w_gate, w_up, w_down} triple per expert.
struct FfnPointers {
  const float* w_gate = nullptr;  // (hidden, d_model)
  const float* w_up = nullptr;    // (hidden, d_model)
  const float* w_down = nullptr;  // (d_model, hidden)
};
struct BlockPointers {
  const float* norm1 = nullptr;  // (d_model)
  const float* wq = nullptr;     // (heads * head_dim, d_model)
  const float* wk = nullptr;     // (kv_heads * head_dim, d_model)
  const float* wv = nullptr;
  const float* wo = nullptr;     // (d_model, heads * head_dim)
  const float* norm2 = nullptr;  // (d_model)
  FfnPointers dense;             // dense FFN (experts == 0)
  const float* router = nullptr;     // (experts, d_model), MoE only
  std::vector<FfnPointers> experts;  // (experts), MoE only
};
struct BlockShape {
  int64_t batch = 0, seq = 0, d_model = 0, heads = 0, kv_heads = 0;
  int64_t hidden = 0;   // the dense FFN's width, or each expert's
  int64_t experts = 0;  // 0: dense FFN
  int64_t top_k = 0;
  double eps = 1e-6;
  double rope_theta = 10000.0;
};

// A pre-norm decoder block as a LibTorch 1.13 user writes it:
//   h = x + wo(attn(rope(wq n1(x)), rope(wk n1(x)), wv n1(x)))   causal mask, softmax(q k^T / sqrt(hd))
//   y = h + ffn(n2(h))
// RMSNorm as LlamaRMSNorm, RoPE half-split ("rotate_half") from cos/sin tables built once (a
// model's buffer), attention as matmul + masked_fill + softmax + matmul (1.13 has no fused
// attention), the FFN SwiGLU. MoE: logits = router x, softmax, topk(k) (weights not
// renormalised: TopKSoftmax), then the gather loop of Mixtral's / DeepSeek's reference code:
// for each expert, the (token, slot) pairs routed to it (nonzero of the one-hot mask),
// index_select of their rows, the expert's SwiGLU, times the weight, index_add back.
// With `backward` a run() also calls y.backward(dy) (x and every weight require grad; grads are
// reset to none first) and result() returns {y, dx, dwq, dw_down (dense, or expert 0's)};
// without it {y}.
Bench block_f32(const float* x, const float* dy, const BlockShape& shape, const BlockPointers& w,
                bool backward);

}  // namespace torch_side

namespace torch_side {

// A whole decoder's training step (train_bench): the R1 layout of models/decoder.hpp as a
// LibTorch 1.13 user writes it. Weights are tessera's, found by their names ("embed.weight",
// "layers.<l>.attn.wq", "layers.<l>.ffn.experts.<e>.w_gate", "lm_head.weight", ...), and COPIED
// into LibTorch parameters (the optimizer updates them; from_blob would write tessera's).
// Names of parts LibTorch does not model are skipped (the learned window gate "attn.gate.*").
struct NamedWeight {
  std::string name;
  const float* data = nullptr;
  std::vector<int64_t> shape;
};
struct DecoderShape {
  int64_t batch = 0, seq = 0, vocab = 0, d_model = 0, layers = 0, heads = 0, kv_heads = 0;
  int64_t dense_layers = 0;
  int64_t experts = 0, top_k = 0, groups = 1, top_groups = 1, shared = 0;
  double eps = 1e-6, rope_theta = 10000.0;
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.95, adam_eps = 1e-8, weight_decay = 0.1;
  double bias_rate = 1e-3;  // aux-loss-free balance: bias += rate * sign(mean load - load)
};

// One training step per run(): grads reset to none, forward (embedding; per block LlamaRMSNorm,
// rotate_half RoPE, matmul + causal masked_fill + softmax attention, and a SwiGLU or the MoE of
// DeepSeek-V3's reference: sigmoid scores, + selection bias, groups scored by their two best,
// top groups, top-k, weights renormalised over the chosen, Mixtral's per-expert gather loop,
// shared experts on every token; final norm, LM head, mean cross-entropy), loss.backward(),
// torch::optim::AdamW::step(), and the bias update from the step's expert load.
// tokens: (batch, seq + 1) ids; inputs are the first seq columns, targets the last seq.
// result(): {{loss of the last step}}.
Bench decoder_train_f32(const std::vector<NamedWeight>& weights, const int32_t* tokens,
                        const DecoderShape& shape);

}  // namespace torch_side
