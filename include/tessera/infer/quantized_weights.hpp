// tessera/infer/quantized_weights.hpp — decoding with quantised weights: the products of
// forward_batch / forward_cached / infer::Engine multiply the packed INT4, FP8 or BF16 matrices
// directly (quant/qgemm.hpp's SIMD kernels), instead of the model's fp32 parameters.
//
//   auto q = ts::quant::load_quantized<ts::quant::Int4AWQ<64>>("model-int4.safetensors", model);
//   ts::infer::QuantizedWeights weights(model, q);
//   auto logits = ts::infer::forward_cached(model, prompt, cache, weights);
//
// Why this is where the speed is: decoding one token multiplies every weight once by a single
// activation row, so a step is bound by the bytes of weights it reads; INT4 reads about 1/6 of
// fp32's (docs/performance.md measures it against the bandwidth bound).
//
// Scope: attention's four projections, the dense FFN and the LM head. An MoE block's experts run
// inside the MoE layer with the model's own parameters; load_quantized (or
// load_effective_weights) sets those to the quantised matrices' effective values, so the
// numbers are those of the format, but the experts' bytes are read as fp32.
//
// A quantised product's row depends only on its own input row (quant/qgemm.hpp), so a sequence
// decoded in a batch gets the same bits as decoded alone.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/infer/kv_cache.hpp"
#include "tessera/quant/model_quant.hpp"
#include "tessera/quant/qgemm.hpp"

namespace tessera::infer {

template <class Model, class Format>
class QuantizedWeights {
 public:
  using T = typename Model::T;
  static_assert(std::is_same_v<T, float>, "QuantizedWeights: the quantised products run float models");

  // Holds pointers into `q`, which must outlive this object.
  QuantizedWeights(Model& model, const quant::QuantizedLinears<Format>& q) {
    using R = typename Model::Resolved;
    layers_.resize(static_cast<std::size_t>(R::layers));
    model.for_each_block([&](int64_t l, auto& block) {
      auto& w = layers_[static_cast<std::size_t>(l)];
      w.fill(nullptr);
      const std::string p = "layers." + std::to_string(static_cast<int64_t>(l)) + ".";
      for (WeightId id : {WeightId::kQ, WeightId::kK, WeightId::kV, WeightId::kO})
        w[index(id)] = &q.at(p + weight_name(id));
      if constexpr (!std::decay_t<decltype(block)>::kMoE) {
        for (WeightId id : {WeightId::kFfnGate, WeightId::kFfnUp, WeightId::kFfnDown})
          w[index(id)] = &q.at(p + weight_name(id));
      }
    });
    head_ = &q.at(std::string(quant::kHeadName));
    for (const auto& layer : layers_)
      for (const auto* m : layer)
        if (m) bytes_ += static_cast<int64_t>(m->bytes());
    bytes_ += static_cast<int64_t>(head_->bytes());
  }

  // x (rows, in) -> (rows, out)
  Tensor<float> linear(int64_t layer, WeightId id, TensorView<const float, Cpu> x) const {
    const quant::QuantizedMatrix<Format>& m = matrix(layer, id);
    const int64_t in = x.dim(x.rank() - 1);
    if (m.cols() == in) return quant::linear(x, m);
    // A matrix stored with zero columns appended (quant::padded_cols): the input gets zeros too.
    TESSERA_CHECK(m.cols() == quant::padded_cols<Format>(in), "QuantizedWeights: ",
                  weight_name(id), " of layer ", layer, " has ", m.cols(),
                  " columns for an input of ", in);
    const Tensor<float> xc = x.contiguous();
    const int64_t rows = xc.numel() / in;
    Tensor<float> padded = Tensor<float>::zeros({rows, m.cols()});
    for (int64_t r = 0; r < rows; ++r)
      std::copy(xc.data() + r * in, xc.data() + (r + 1) * in, padded.data() + r * m.cols());
    return quant::linear(padded, m);
  }

  const quant::QuantizedMatrix<Format>& matrix(int64_t layer, WeightId id) const {
    if (id == WeightId::kHead) return *head_;
    TESSERA_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()),
                  "QuantizedWeights: layer ", layer, " is outside [0, ", layers_.size(), ")");
    const auto* m = layers_[static_cast<std::size_t>(layer)][index(id)];
    TESSERA_CHECK(m != nullptr, "QuantizedWeights: layer ", layer, " has no ", weight_name(id),
                  " (an MoE block runs its experts itself)");
    return *m;
  }

  // Bytes of the matrices these products read per decoded token (MoE experts not included).
  int64_t bytes() const { return bytes_; }

 private:
  static constexpr std::size_t index(WeightId id) { return static_cast<std::size_t>(id); }
  std::vector<std::array<const quant::QuantizedMatrix<Format>*, 7>> layers_;
  const quant::QuantizedMatrix<Format>* head_ = nullptr;
  int64_t bytes_ = 0;
};

template <class Model, class Format>
QuantizedWeights(Model&, const quant::QuantizedLinears<Format>&) -> QuantizedWeights<Model, Format>;

}  // namespace tessera::infer
