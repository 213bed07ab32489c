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

#include <cmath>
#include <limits>
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
