// benchmarks/decode_torch.cpp — LibTorch side of decode_bench: Llama decode as a PyTorch user
// writes it (the Hugging Face modeling code, in libtorch ops, inference mode, a KV cache).
#include "decode_torch.hpp"

#include <torch/torch.h>

#include <chrono>

namespace decode_torch {

namespace {

torch::Tensor wrap(const float* p, std::vector<int64_t> shape) {
  return torch::from_blob(const_cast<float*>(p), shape, torch::kFloat32);
}

torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
}

// Half-split RoPE on x (T, H, hd) at positions pos .. pos+T-1.
torch::Tensor rope(const torch::Tensor& x, int64_t pos, double theta) {
  const int64_t T = x.size(0), hd = x.size(2), half = hd / 2;
  auto inv = torch::pow(theta, -torch::arange(0, half, torch::kFloat64) * 2.0 / hd);
  auto ang = torch::outer(torch::arange(pos, pos + T, torch::kFloat64), inv).to(torch::kFloat32);
  auto c = torch::cos(ang).unsqueeze(1), s = torch::sin(ang).unsqueeze(1);  // (T, 1, half)
  auto a = x.slice(2, 0, half), b = x.slice(2, half, hd);
  return torch::cat({a * c - b * s, a * s + b * c}, 2);
}

}  // namespace

void set_num_threads(int n) { torch::set_num_threads(n); }

std::vector<int32_t> greedy(const LlamaWeights& w, const std::vector<int32_t>& prompt,
                            int new_tokens, double* prefill_s, double* decode_s) {
  torch::InferenceMode guard;
  const int64_t C = w.d_model, H = w.heads, KV = w.kv_heads, hd = C / H;
  auto embed = wrap(w.embed, {w.vocab, C});
  auto fnorm = wrap(w.final_norm, {C});
  struct L {
    torch::Tensor n1, wq, wk, wv, wo, n2, g, u, d;
  };
  std::vector<L> layers;
  for (const auto& l : w.layer)
    layers.push_back({wrap(l.norm1, {C}), wrap(l.wq, {C, C}), wrap(l.wk, {KV * hd, C}),
                      wrap(l.wv, {KV * hd, C}), wrap(l.wo, {C, C}), wrap(l.norm2, {C}),
                      wrap(l.w_gate, {w.ffn, C}), wrap(l.w_up, {w.ffn, C}),
                      wrap(l.w_down, {C, w.ffn})});
  std::vector<torch::Tensor> kc(layers.size()), vc(layers.size());
  int64_t pos = 0;
  auto step = [&](const std::vector<int64_t>& ids) {
    const int64_t T = static_cast<int64_t>(ids.size());
    auto x = embed.index_select(0, torch::tensor(ids, torch::kInt64));  // (T, C)
    for (size_t l = 0; l < layers.size(); ++l) {
      const L& p = layers[l];
      auto h = rms(x, p.n1, w.eps);
      auto q = rope(torch::matmul(h, p.wq.t()).view({T, H, hd}), pos, w.rope_theta);
      auto k = rope(torch::matmul(h, p.wk.t()).view({T, KV, hd}), pos, w.rope_theta);
      auto v = torch::matmul(h, p.wv.t()).view({T, KV, hd});
      kc[l] = pos ? torch::cat({kc[l], k}, 0) : k;
      vc[l] = pos ? torch::cat({vc[l], v}, 0) : v;
      auto K = kc[l].repeat_interleave(H / KV, 1).transpose(0, 1);  // (H, S, hd)
      auto V = vc[l].repeat_interleave(H / KV, 1).transpose(0, 1);
      auto s = torch::matmul(q.transpose(0, 1), K.transpose(1, 2)) / std::sqrt(double(hd));
      if (T > 1) {
        auto mask = torch::ones({T, pos + T}, torch::kBool).triu(pos + 1);
        s = s.masked_fill(mask, -std::numeric_limits<float>::infinity());
      }
      auto o = torch::matmul(torch::softmax(s, -1), V).transpose(0, 1).reshape({T, C});
      x = x + torch::matmul(o, p.wo.t());
      h = rms(x, p.n2, w.eps);
      x = x + torch::matmul(torch::silu(torch::matmul(h, p.g.t())) * torch::matmul(h, p.u.t()),
                            p.d.t());
    }
    pos += T;
    auto last = rms(x.slice(0, T - 1, T), fnorm, w.eps);
    return torch::matmul(last, embed.t()).argmax(-1).item<int64_t>();
  };
  std::vector<int32_t> out;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t next = step(std::vector<int64_t>(prompt.begin(), prompt.end()));
  const auto t1 = std::chrono::steady_clock::now();
  out.push_back(static_cast<int32_t>(next));
  for (int i = 1; i < new_tokens; ++i) {
    next = step({next});
    out.push_back(static_cast<int32_t>(next));
  }
  const auto t2 = std::chrono::steady_clock::now();
  *prefill_s = std::chrono::duration<double>(t1 - t0).count();
  *decode_s = std::chrono::duration<double>(t2 - t1).count();
  return out;
}

}  // namespace decode_torch
