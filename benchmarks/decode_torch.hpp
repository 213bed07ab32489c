// benchmarks/decode_torch.hpp — a Llama decoder with a KV cache written with LibTorch ops, the
// peer of decode_bench. Plain pointers in, so only decode_torch.cpp includes <torch/torch.h>.
#pragma once

#include <cstdint>
#include <vector>

namespace decode_torch {

// Row-major float weights (Hugging Face layout: RoPE in half-split pairs), borrowed, not copied.
struct LlamaWeights {
  int64_t vocab = 0, d_model = 0, layers = 0, heads = 0, kv_heads = 0, ffn = 0;
  double rope_theta = 10000.0, eps = 1e-5;
  const float* embed = nullptr;       // (vocab, d_model), also the tied head
  const float* final_norm = nullptr;  // (d_model)
  struct Layer {
    const float *norm1, *wq, *wk, *wv, *wo, *norm2, *w_gate, *w_up, *w_down;
  };
  std::vector<Layer> layer;
};

// Greedy: prefill `prompt`, then decode `new_tokens` tokens one at a time with a KV cache.
// Returns the tokens; *decode_s receives the seconds spent in the decode steps after the first.
std::vector<int32_t> greedy(const LlamaWeights& w, const std::vector<int32_t>& prompt,
                            int new_tokens, double* prefill_s, double* decode_s);

void set_num_threads(int n);

}  // namespace decode_torch
