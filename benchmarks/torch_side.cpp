// benchmarks/torch_side.cpp — the only file of tessera_bench that includes LibTorch.
//
// Each op is written the way a LibTorch user writes it (allocating calls, autograd for the
// backward), because that is what tessera is measured against. The inputs are the caller's
// buffers wrapped by from_blob (no copy, no ownership), so both halves read the same bytes.
// Each closure keeps its output alive until the next call, as a training loop would.
#include "torch_side.hpp"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <sstream>

namespace torch_side {
namespace {

torch::Tensor wrap_f32(const float* p, std::vector<int64_t> shape) {
  return torch::from_blob(const_cast<float*>(p), shape, torch::TensorOptions().dtype(torch::kFloat32));
}

std::vector<float> to_vector(const torch::Tensor& t) {
  const torch::Tensor f = t.to(torch::kFloat32).contiguous();
  const float* p = f.data_ptr<float>();
  return std::vector<float>(p, p + f.numel());
}

// The first line of show_config() that mentions `key`, trimmed, or "".
std::string config_line(const std::string& config, const std::string& key) {
  std::istringstream in(config);
  std::string line;
  while (std::getline(in, line)) {
    if (line.find(key) == std::string::npos) continue;
    const auto b = line.find_first_not_of(" -\t");
    return b == std::string::npos ? "" : line.substr(b);
  }
  return "";
}

}  // namespace

std::string describe() {
  std::ostringstream s;
  s << "LibTorch " << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "."
    << TORCH_VERSION_PATCH << "; MKLDNN (oneDNN) " << (torch::hasMKLDNN() ? "on" : "off")
    << ", MKL " << (torch::hasMKL() ? "on" : "off");
  const std::string config = at::show_config();
  for (const char* key : {"CPU capability usage", "BLAS_INFO", "USE_MKLDNN"}) {
    const std::string line = config_line(config, key);
    if (line.empty()) continue;
    // show_config's "Build settings" line is long; keep the BLAS_INFO item only.
    if (std::string(key) == "BLAS_INFO") {
      const auto p = line.find("BLAS_INFO=");
      if (p == std::string::npos) continue;
      s << "; " << line.substr(p, line.find(',', p) - p);
    } else if (std::string(key) == "USE_MKLDNN") {
      continue;
    } else {
      s << "; " << line;
    }
  }
  const std::string parallel = config_line(at::get_parallel_info(), "ATen parallel backend");
  if (!parallel.empty()) s << "; " << parallel;
  return s.str();
}

void set_num_threads(int n) { torch::set_num_threads(n); }
int num_threads() { return torch::get_num_threads(); }

Bench matmul_f32(const float* a, const float* b, int64_t m, int64_t k, int64_t n) {
  auto ta = wrap_f32(a, {m, k});
  auto tb = wrap_f32(b, {k, n});
  auto out = std::make_shared<torch::Tensor>();
  return {[ta, tb, out] { *out = torch::matmul(ta, tb); },
          [out] { return std::vector<std::vector<float>>{to_vector(*out)}; }};
}

Bench matmul_bf16(const uint16_t* a, const uint16_t* b, int64_t m, int64_t k, int64_t n) {
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16);
  auto ta = torch::from_blob(const_cast<uint16_t*>(a), {m, k}, opts);
  auto tb = torch::from_blob(const_cast<uint16_t*>(b), {k, n}, opts);
  auto out = std::make_shared<torch::Tensor>();
  return {[ta, tb, out] { *out = torch::matmul(ta, tb); },
          [out] { return std::vector<std::vector<float>>{to_vector(*out)}; }};
}

Bench softmax_f32(const float* x, int64_t rows, int64_t cols) {
  auto tx = wrap_f32(x, {rows, cols});
  auto out = std::make_shared<torch::Tensor>();
  return {[tx, out] { *out = torch::softmax(tx, -1); }, [out] { return std::vector<std::vector<float>>{to_vector(*out)}; }};
}

Bench rmsnorm_f32(const float* x, const float* weight, int64_t rows, int64_t cols, float eps) {
  auto tx = wrap_f32(x, {rows, cols});
  auto tw = wrap_f32(weight, {cols});
  auto out = std::make_shared<torch::Tensor>();
  return {[tx, tw, out, eps] {
            const auto rstd = torch::rsqrt(tx.pow(2).mean(-1, /*keepdim=*/true) + eps);
            *out = tx * rstd * tw;
          },
          [out] { return std::vector<std::vector<float>>{to_vector(*out)}; }};
}

Bench cross_entropy_f32(const float* logits, const int64_t* targets, int64_t rows, int64_t vocab) {
  // A leaf that requires grad must own its storage's autograd meta, not its bytes: from_blob
  // is fine, the gradient lands in a tensor LibTorch allocates.
  auto tl = wrap_f32(logits, {rows, vocab}).requires_grad_(true);
  auto tt = torch::from_blob(const_cast<int64_t*>(targets), {rows},
                             torch::TensorOptions().dtype(torch::kInt64));
  struct State {
    torch::Tensor loss;
    torch::Tensor dlogits;
  };
  auto st = std::make_shared<State>();
  return {[tl, tt, st]() mutable {
            // Drop the previous gradient so backward writes a fresh one (as zero_grad(set_to_none)
            // does in a training loop) instead of accumulating into it.
            tl.mutable_grad() = torch::Tensor();
            st->loss = torch::nn::functional::cross_entropy(tl, tt);
            st->loss.backward();
            st->dlogits = tl.grad();
          },
          [st] {
            return std::vector<std::vector<float>>{to_vector(st->loss), to_vector(st->dlogits)};
          }};
}

Bench attention_f32(const float* q, const float* k, const float* v, const float* d_o,
                    const int64_t* window, int64_t batch, int64_t seq, int64_t heads,
                    int64_t kv_heads, int64_t head_dim, bool backward) {
  // Leaves that may require grad (from_blob: the gradients land in tensors LibTorch allocates).
  auto tq = wrap_f32(q, {batch, seq, heads, head_dim});
  auto tk = wrap_f32(k, {batch, seq, kv_heads, head_dim});
  auto tv = wrap_f32(v, {batch, seq, kv_heads, head_dim});
  if (backward) {
    tq.requires_grad_(true);
    tk.requires_grad_(true);
    tv.requires_grad_(true);
  }
  auto tdo = backward ? wrap_f32(d_o, {batch, seq, heads, head_dim}).permute({0, 2, 1, 3})
                      : torch::Tensor();
  // mask (B, 1, T, T): true where the key is NOT read.
  const auto pos = torch::arange(seq, torch::TensorOptions().dtype(torch::kInt64));
  const auto i = pos.view({1, 1, seq, 1}), j = pos.view({1, 1, 1, seq});
  const auto w = torch::from_blob(const_cast<int64_t*>(window), {batch, 1, seq, 1},
                                  torch::TensorOptions().dtype(torch::kInt64));
  const auto mask = ((j > i) | (i - j >= w)).contiguous();
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const int64_t group = heads / kv_heads;
  struct State {
    torch::Tensor o;  // (B, H, T, D)
  };
  auto st = std::make_shared<State>();
  auto run = [=]() mutable {
    if (backward) {
      tq.mutable_grad() = torch::Tensor();
      tk.mutable_grad() = torch::Tensor();
      tv.mutable_grad() = torch::Tensor();
    }
    auto qh = tq.permute({0, 2, 1, 3});  // (B, H, T, D)
    auto kh = tk.permute({0, 2, 1, 3});  // (B, KV, T, D)
    auto vh = tv.permute({0, 2, 1, 3});
    if (group > 1) {
      kh = kh.repeat_interleave(group, 1);
      vh = vh.repeat_interleave(group, 1);
    }
    auto s = torch::matmul(qh, kh.transpose(-2, -1)).mul_(scale);  // (B, H, T, T)
    s.masked_fill_(mask, -std::numeric_limits<float>::infinity());
    st->o = torch::matmul(torch::softmax(s, -1), vh);
    if (backward) st->o.backward(tdo);
  };
  auto result = [=] {
    std::vector<std::vector<float>> out{to_vector(st->o.detach().permute({0, 2, 1, 3}))};
    if (backward) {
      out.push_back(to_vector(tq.grad()));
      out.push_back(to_vector(tk.grad()));
      out.push_back(to_vector(tv.grad()));
    }
    return out;
  };
  return {run, result};
}

}  // namespace torch_side

namespace torch_side {

Bench block_f32(const float* x, const float* dy, const BlockShape& s, const BlockPointers& w,
                bool backward) {
  namespace F = torch::nn::functional;
  const int64_t B = s.batch, T = s.seq, C = s.d_model, H = s.heads, KV = s.kv_heads;
  const int64_t hd = C / H, group = H / KV;
  auto leaf = [&](const float* p, std::vector<int64_t> shape) {
    auto t = wrap_f32(p, std::move(shape));
    if (backward) t.requires_grad_(true);
    return t;
  };
  struct Ffn {
    torch::Tensor gate, up, down;
  };
  auto ffn_leaves = [&](const FfnPointers& f) {
    return Ffn{leaf(f.w_gate, {s.hidden, C}), leaf(f.w_up, {s.hidden, C}),
               leaf(f.w_down, {C, s.hidden})};
  };
  struct Weights {
    torch::Tensor x, norm1, wq, wk, wv, wo, norm2, router;
    Ffn dense;
    std::vector<Ffn> experts;
  };
  auto wt = std::make_shared<Weights>();
  wt->x = leaf(x, {B, T, C});
  wt->norm1 = leaf(w.norm1, {C});
  wt->wq = leaf(w.wq, {H * hd, C});
  wt->wk = leaf(w.wk, {KV * hd, C});
  wt->wv = leaf(w.wv, {KV * hd, C});
  wt->wo = leaf(w.wo, {C, H * hd});
  wt->norm2 = leaf(w.norm2, {C});
  if (s.experts == 0) {
    wt->dense = ffn_leaves(w.dense);
  } else {
    wt->router = leaf(w.router, {s.experts, C});
    for (const FfnPointers& e : w.experts) wt->experts.push_back(ffn_leaves(e));
  }
  auto tdy = backward ? wrap_f32(dy, {B, T, C}) : torch::Tensor();
  // Buffers a model builds once: the RoPE tables (angles in double, then float) and the mask.
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto inv_freq = 1.0 / torch::pow(s.rope_theta, torch::arange(0, hd, 2, f64) / double(hd));
  auto angle = torch::arange(T, f64).unsqueeze(1) * inv_freq;      // (T, hd/2)
  auto cos = torch::cos(angle).to(torch::kFloat32).view({1, T, 1, hd / 2});
  auto sin = torch::sin(angle).to(torch::kFloat32).view({1, T, 1, hd / 2});
  auto mask = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool)).triu(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  const float eps = static_cast<float>(s.eps);
  const int64_t top_k = s.top_k, n_experts = s.experts;

  auto rmsnorm = [eps](const torch::Tensor& t, const torch::Tensor& g) {
    return t * torch::rsqrt(t.pow(2).mean(-1, /*keepdim=*/true) + eps) * g;
  };
  auto rope = [cos, sin, hd](const torch::Tensor& t) {  // (B, T, heads, hd), rotate_half
    auto x1 = t.narrow(-1, 0, hd / 2), x2 = t.narrow(-1, hd / 2, hd / 2);
    return torch::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
  };
  auto swiglu = [](const Ffn& f, const torch::Tensor& t) {
    return F::linear(torch::silu(F::linear(t, f.gate)) * F::linear(t, f.up), f.down);
  };

  struct State {
    torch::Tensor y;
  };
  auto st = std::make_shared<State>();
  auto run = [=]() mutable {
    Weights& p = *wt;
    if (backward) {
      for (torch::Tensor* t : {&p.x, &p.norm1, &p.wq, &p.wk, &p.wv, &p.wo, &p.norm2, &p.router,
                               &p.dense.gate, &p.dense.up, &p.dense.down})
        if (t->defined()) t->mutable_grad() = torch::Tensor();
      for (Ffn& e : p.experts)
        for (torch::Tensor* t : {&e.gate, &e.up, &e.down}) t->mutable_grad() = torch::Tensor();
    }
    auto h1 = rmsnorm(p.x, p.norm1);                                       // (B, T, C)
    auto q = rope(F::linear(h1, p.wq).view({B, T, H, hd})).transpose(1, 2);   // (B, H, T, hd)
    auto k = rope(F::linear(h1, p.wk).view({B, T, KV, hd})).transpose(1, 2);  // (B, KV, T, hd)
    auto v = F::linear(h1, p.wv).view({B, T, KV, hd}).transpose(1, 2);
    if (group > 1) {
      k = k.repeat_interleave(group, 1);
      v = v.repeat_interleave(group, 1);
    }
    auto scores = torch::matmul(q, k.transpose(-2, -1)).mul_(scale);  // (B, H, T, T)
    scores.masked_fill_(mask, -std::numeric_limits<float>::infinity());
    auto o = torch::matmul(torch::softmax(scores, -1), v).transpose(1, 2).reshape({B, T, C});
    auto h = p.x + F::linear(o, p.wo);  // (B, T, C)
    auto h2 = rmsnorm(h, p.norm2);
    torch::Tensor f;
    if (n_experts == 0) {
      f = swiglu(p.dense, h2);
    } else {
      auto flat = h2.reshape({B * T, C});                                  // (N, C)
      auto probs = torch::softmax(F::linear(flat, p.router), -1);          // (N, E)
      auto [top_w, top_i] = torch::topk(probs, top_k, -1);                 // (N, k)
      auto out = torch::zeros_like(flat);
      // (E, k, N) one-hot of the choices, as Mixtral's reference loop builds it.
      auto hit = F::one_hot(top_i, n_experts).permute({2, 1, 0});
      for (int64_t e = 0; e < n_experts; ++e) {
        auto idx = torch::where(hit[e]);  // slot, token
        const auto& slot = idx[0];
        const auto& tok = idx[1];
        if (tok.numel() == 0) continue;
        auto ye = swiglu(p.experts[size_t(e)], flat.index_select(0, tok));
        auto we = top_w.index({tok, slot}).unsqueeze(1);
        out = out.index_add(0, tok, ye * we);
      }
      f = out.view({B, T, C});
    }
    st->y = h + f;
    if (backward) st->y.backward(tdy);
  };
  auto result = [=] {
    std::vector<std::vector<float>> out{to_vector(st->y.detach())};
    if (backward) {
      out.push_back(to_vector(wt->x.grad()));
      out.push_back(to_vector(wt->wq.grad()));
      out.push_back(to_vector(n_experts == 0 ? wt->dense.down.grad() : wt->experts[0].down.grad()));
    }
    return out;
  };
  return {run, result};
}

}  // namespace torch_side

namespace torch_side {

Bench decoder_train_f32(const std::vector<NamedWeight>& weights, const int32_t* tokens,
                        const DecoderShape& s) {
  namespace F = torch::nn::functional;
  const int64_t B = s.batch, T = s.seq, C = s.d_model, H = s.heads, KV = s.kv_heads;
  const int64_t hd = C / H, group = H / KV;

  struct Model {
    std::map<std::string, torch::Tensor> p;  // parameters by tessera's name
    std::vector<torch::Tensor> bias;         // (experts) per layer; undefined for dense layers
    std::unique_ptr<torch::optim::AdamW> opt;
    torch::Tensor inputs, targets, cos, sin, mask;
    torch::Tensor loss;
  };
  auto m = std::make_shared<Model>();
  std::vector<torch::Tensor> params;
  for (const NamedWeight& w : weights) {
    if (w.name.find(".attn.gate.") != std::string::npos) continue;
    auto t = wrap_f32(w.data, w.shape).clone().requires_grad_(true);
    m->p.emplace(w.name, t);
    params.push_back(t);
  }
  for (int64_t l = 0; l < s.layers; ++l)
    m->bias.push_back(l < s.dense_layers ? torch::Tensor() : torch::zeros({s.experts}));
  m->opt = std::make_unique<torch::optim::AdamW>(
      params, torch::optim::AdamWOptions(s.lr)
                  .betas({s.beta1, s.beta2})
                  .eps(s.adam_eps)
                  .weight_decay(s.weight_decay));
  auto seq = torch::from_blob(const_cast<int32_t*>(tokens), {B, T + 1},
                              torch::TensorOptions().dtype(torch::kInt32))
                 .to(torch::kInt64);
  m->inputs = seq.narrow(1, 0, T).contiguous();
  m->targets = seq.narrow(1, 1, T).contiguous();
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto inv_freq = 1.0 / torch::pow(s.rope_theta, torch::arange(0, hd, 2, f64) / double(hd));
  auto angle = torch::arange(T, f64).unsqueeze(1) * inv_freq;  // (T, hd/2)
  m->cos = torch::cos(angle).to(torch::kFloat32).view({1, T, 1, hd / 2});
  m->sin = torch::sin(angle).to(torch::kFloat32).view({1, T, 1, hd / 2});
  m->mask = torch::ones({T, T}, torch::TensorOptions().dtype(torch::kBool)).triu(1);

  auto run = [=] {
    Model& M = *m;
    auto P = [&](const std::string& name) -> const torch::Tensor& { return M.p.at(name); };
    const float eps = static_cast<float>(s.eps);
    auto rmsnorm = [eps](const torch::Tensor& t, const torch::Tensor& g) {
      return t * torch::rsqrt(t.pow(2).mean(-1, /*keepdim=*/true) + eps) * g;
    };
    auto rope = [&](const torch::Tensor& t) {  // (B, T, heads, hd), rotate_half
      auto x1 = t.narrow(-1, 0, hd / 2), x2 = t.narrow(-1, hd / 2, hd / 2);
      return torch::cat({x1 * M.cos - x2 * M.sin, x2 * M.cos + x1 * M.sin}, -1);
    };
    auto swiglu = [&](const std::string& pre, const torch::Tensor& t) {
      return F::linear(torch::silu(F::linear(t, P(pre + "w_gate"))) * F::linear(t, P(pre + "w_up")),
                       P(pre + "w_down"));
    };
    // Grads to none (set_to_none), so backward writes them instead of adding to zeros.
    for (auto& kv : M.p) kv.second.mutable_grad() = torch::Tensor();
    auto h = F::embedding(M.inputs, P("embed.weight"));  // (B, T, C)
    std::vector<torch::Tensor> loads;
    for (int64_t l = 0; l < s.layers; ++l) {
      const std::string pre = "layers." + std::to_string(l) + ".";
      auto h1 = rmsnorm(h, P(pre + "norm1.weight"));
      auto q = rope(F::linear(h1, P(pre + "attn.wq")).view({B, T, H, hd})).transpose(1, 2);
      auto k = rope(F::linear(h1, P(pre + "attn.wk")).view({B, T, KV, hd})).transpose(1, 2);
      auto v = F::linear(h1, P(pre + "attn.wv")).view({B, T, KV, hd}).transpose(1, 2);
      if (group > 1) {
        k = k.repeat_interleave(group, 1);
        v = v.repeat_interleave(group, 1);
      }
      auto scores = torch::matmul(q, k.transpose(-2, -1)).mul_(1.0 / std::sqrt(double(hd)));
      scores.masked_fill_(M.mask, -std::numeric_limits<float>::infinity());
      auto o = torch::matmul(torch::softmax(scores, -1), v).transpose(1, 2).reshape({B, T, C});
      h = h + F::linear(o, P(pre + "attn.wo"));
      auto h2 = rmsnorm(h, P(pre + "norm2.weight"));
      if (l < s.dense_layers) {
        h = h + swiglu(pre + "ffn.", h2);
        continue;
      }
      auto flat = h2.reshape({B * T, C});                                         // (N, C)
      auto scores_e = torch::sigmoid(F::linear(flat, P(pre + "ffn.router.gate")));  // (N, E)
      torch::Tensor chosen;
      {
        torch::NoGradGuard no_grad;  // the choice is discrete; only the weights carry gradient
        auto sel = scores_e + M.bias[size_t(l)];
        auto grouped = sel.view({B * T, s.groups, s.experts / s.groups});
        auto group_score = std::get<0>(grouped.topk(std::min<int64_t>(2, s.experts / s.groups), -1)).sum(-1);
        auto top_groups = std::get<1>(group_score.topk(s.top_groups, -1));
        auto keep = torch::zeros({B * T, s.groups}, torch::TensorOptions().dtype(torch::kBool))
                        .scatter_(1, top_groups, true);
        sel = sel.view({B * T, s.groups, -1})
                  .masked_fill(keep.logical_not().unsqueeze(-1), -std::numeric_limits<float>::infinity())
                  .view({B * T, s.experts});
        chosen = std::get<1>(sel.topk(s.top_k, -1));  // (N, k)
      }
      auto w = scores_e.gather(1, chosen);
      w = w / w.sum(-1, /*keepdim=*/true);
      auto out = torch::zeros_like(flat);
      auto hit = F::one_hot(chosen, s.experts).permute({2, 1, 0});  // (E, k, N)
      for (int64_t e = 0; e < s.experts; ++e) {
        auto idx = torch::where(hit[e]);
        const auto& slot = idx[0];
        const auto& tok = idx[1];
        if (tok.numel() == 0) continue;
        auto ye = swiglu(pre + "ffn.experts." + std::to_string(e) + ".", flat.index_select(0, tok));
        out = out.index_add(0, tok, ye * w.index({tok, slot}).unsqueeze(1));
      }
      for (int64_t e = 0; e < s.shared; ++e)
        out = out + swiglu(pre + "ffn.shared_experts." + std::to_string(e) + ".", flat);
      h = h + out.view({B, T, C});
      loads.push_back(torch::bincount(chosen.flatten(), {}, s.experts));
    }
    auto logits = F::linear(rmsnorm(h, P("norm.weight")), P("lm_head.weight"));  // (B, T, V)
    M.loss = F::cross_entropy(logits.view({B * T, s.vocab}), M.targets.view({B * T}));
    M.loss.backward();
    M.opt->step();
    torch::NoGradGuard no_grad;
    size_t i = 0;
    for (int64_t l = s.dense_layers; l < s.layers; ++l, ++i) {
      auto load = loads[i].to(torch::kFloat32);
      M.bias[size_t(l)].add_(torch::sign(load.mean() - load) * s.bias_rate);
    }
  };
  auto result = [=] { return std::vector<std::vector<float>>{to_vector(m->loss.detach())}; };
  return {run, result};
}

}  // namespace torch_side
