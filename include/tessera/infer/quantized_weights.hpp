// tessera/infer/quantized_weights.hpp — decoding with quantised weights: the products of
// forward_batch / forward_cached / infer::Engine multiply the packed INT4, FP8 or BF16 matrices
// directly (quant/qgemm.hpp's SIMD kernels), instead of the model's fp32 parameters.
//
//   auto q = ts::quant::load_quantized<ts::quant::Int4AWQ<64>>("model-int4.safetensors", model);
//   ts::infer::QuantizedWeights weights(model, std::move(q));  // or a copy of q
//   auto logits = ts::infer::forward_cached(model, prompt, cache, weights);
//
// Why this is where the speed is: decoding one token multiplies every weight once by a single
// activation row, so a step is bound by the bytes of weights it reads; INT4 reads about 1/6 of
// fp32's (docs/performance.md measures it against the bandwidth bound).
//
// Scope: attention's four projections, the dense FFN, every MoE expert (routed and shared,
// through expert_ffn: forward_batch keeps the MoE layer's routing and weighted sum and hands each
// expert its rows) and the LM head (or, with HeadWeights::kModel, the model's own head). Not
// quantised: the embedding lookup (one row per token; a tied head is the quantised matrix),
// norms, the MoE router and the window selector, which run with the model's own parameters
// (quant/model_quant.hpp says why).
//
// A quantised product's row depends only on its own input row (quant/qgemm.hpp), so a sequence
// decoded in a batch gets the same bits as decoded alone.
//
// Fused products: the matrices that read the same input (q/k/v: norm1's output; gate/up:
// norm2's output) are stored stacked, one (out_q + out_k + out_v, in) matrix per layer, and
// forward_batch multiplies them in one call (linear_group). Why: SmolLM2's k and v are only
// 576 x 192; as separate products each costs a parallel region and a copy of x, which at one
// row per step is a visible part of the step (docs/performance.md). A stacked matrix's rows are
// the separate matrices' rows, block for block, so every output is the same sequence of
// operations as the separate product's: the same bits. Stacking needs the same columns and, for
// AWQ, the same input scales (quantize_linears gives matrices that read one input one scale
// vector); otherwise the matrices stay separate. The object owns its matrices: pass the
// QuantizedLinears by value (std::move it to avoid the copy); the stacked ones are moved, not
// duplicated.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/tensor.hpp"
#include "tessera/infer/kv_cache.hpp"
#include "tessera/ops/activation.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/quant/model_quant.hpp"
#include "tessera/quant/qgemm.hpp"

namespace tessera::infer {

// Where the LM head's product comes from. The head is the matrix whose rounding every choice of
// the next token sees directly, so 4-bit files usually keep it wider (llama.cpp's Q4_1 SmolLM2
// ships it as Q8_0; re-quantised to 4 bits, that model answers "What is the capital of France?"
// wrongly). kModel multiplies by the model's own head parameter (ops::linear) instead of the
// quantised matrix; the quantised head in the QuantizedLinears is then dropped.
enum class HeadWeights { kQuantized, kModel };

template <class Model, class Format>
class QuantizedWeights {
 public:
  using T = typename Model::T;
  using Matrix = quant::QuantizedMatrix<Format>;
  static_assert(std::is_same_v<T, float>, "QuantizedWeights: the quantised products run float models");

  QuantizedWeights(Model& model, quant::QuantizedLinears<Format> q,
                   HeadWeights head = HeadWeights::kQuantized) {
    using R = typename Model::Resolved;
    layers_.resize(static_cast<std::size_t>(R::layers));
    model.for_each_block([&](int64_t l, auto& block) {
      Layer& layer = layers_[static_cast<std::size_t>(l)];
      const std::string p = "layers." + std::to_string(static_cast<int64_t>(l)) + ".";
      auto take = [&](WeightId id) {
        const std::string name = p + weight_name(id);
        (void)q.at(name);  // a clear error when it is missing
        layer.own[index(id)] = std::move(q.matrices.at(name));
        layer.present[index(id)] = true;
        q.matrices.erase(name);
      };
      for (WeightId id : {WeightId::kQ, WeightId::kK, WeightId::kV, WeightId::kO}) take(id);
      stack(layer, {WeightId::kQ, WeightId::kK, WeightId::kV});
      using Block = std::decay_t<decltype(block)>;
      if constexpr (!Block::kMoE) {
        for (WeightId id : {WeightId::kFfnGate, WeightId::kFfnUp, WeightId::kFfnDown}) take(id);
        stack(layer, {WeightId::kFfnGate, WeightId::kFfnUp});
      } else {
        // Each expert is held as a Layer with only its FFN slots filled.
        auto expert = [&](const std::string& prefix) {
          Layer ex;
          for (WeightId id : {WeightId::kFfnGate, WeightId::kFfnUp, WeightId::kFfnDown}) {
            const std::string name = prefix + (weight_name(id) + 4);  // "ffn.w_gate" -> "w_gate"
            (void)q.at(name);
            ex.own[index(id)] = std::move(q.matrices.at(name));
            ex.present[index(id)] = true;
            q.matrices.erase(name);
          }
          stack(ex, {WeightId::kFfnGate, WeightId::kFfnUp});
          return ex;
        };
        for (int e = 0; e < Block::FfnLayer::kExperts; ++e)
          layer.experts.push_back(expert(p + "ffn.experts." + std::to_string(e) + "."));
        for (int e = 0; e < Block::FfnLayer::kShared; ++e)
          layer.shared_experts.push_back(expert(p + "ffn.shared_experts." + std::to_string(e) + "."));
      }
    });
    if (head == HeadWeights::kModel) {
      model_head_ = &model.lm_head_weight().value;
      q.matrices.erase(std::string(quant::kHeadName));
      bytes_ += model_head_->numel() * static_cast<int64_t>(sizeof(T));
    } else {
      (void)q.at(std::string(quant::kHeadName));
      head_ = std::move(q.matrices.at(std::string(quant::kHeadName)));
      bytes_ += static_cast<int64_t>(head_.bytes());
    }
    for (const Layer& layer : layers_) {
      bytes_ += layer_bytes(layer);
      for (const Layer& ex : layer.experts) expert_bytes_ += layer_bytes(ex);
      for (const Layer& ex : layer.shared_experts) expert_bytes_ += layer_bytes(ex);
    }
  }

  // x (rows, in) -> (rows, out)
  Tensor<float> linear(int64_t layer, WeightId id, TensorView<const float, Cpu> x) const {
    if (id == WeightId::kHead)
      return model_head_ != nullptr ? ops::linear<float>(x, *model_head_) : product(head_, id, layer, x);
    return linear_in(at(layer), layer, id, x);
  }

  // One (rows, out_i) tensor per id; a group stored stacked is one product.
  std::vector<Tensor<float>> linear_group(int64_t layer, std::span<const WeightId> ids,
                                          TensorView<const float, Cpu> x) const {
    if (!ids.empty() && ids[0] == WeightId::kHead) {
      std::vector<Tensor<float>> out;
      for (WeightId id : ids) out.push_back(linear(layer, id, x));
      return out;
    }
    return group_in(at(layer), layer, ids, x);
  }

  // An MoE expert's SwiGLU FFN, w_down(silu(w_gate x) * (w_up x)), gate and up as one product.
  // x (rows, C) -> (rows, C).
  Tensor<float> expert_ffn(int64_t layer, ExpertId e, TensorView<const float, Cpu> x) const {
    const Layer& ly = at(layer);
    const std::vector<Layer>& list = e.shared ? ly.shared_experts : ly.experts;
    TESSERA_CHECK(e.index >= 0 && e.index < static_cast<int>(list.size()), "QuantizedWeights: layer ",
                  layer, " has no ", e.shared ? "shared expert " : "expert ", e.index);
    const Layer& ex = list[static_cast<std::size_t>(e.index)];
    const WeightId gate_up[2] = {WeightId::kFfnGate, WeightId::kFfnUp};
    const std::vector<Tensor<float>> gu = group_in(ex, layer, gate_up, x);  // (rows, hidden) x 2
    const Tensor<float> act = ops::swiglu<float>(gu[0], gu[1]);            // (rows, hidden)
    return linear_in(ex, layer, WeightId::kFfnDown, act);                  // (rows, C)
  }

  // The matrix of one weight; a stacked weight has none of its own (see the file header).
  const Matrix& matrix(int64_t layer, WeightId id) const {
    TESSERA_CHECK(id != WeightId::kHead || model_head_ == nullptr,
                  "QuantizedWeights::matrix: the head is the model's own (HeadWeights::kModel)");
    if (id == WeightId::kHead) return head_;
    return own_matrix(at(layer), layer, id);
  }
  // Whether `id` of `layer` is stored in a stacked matrix (multiplied in one call with its group).
  bool stacked(int64_t layer, WeightId id) const {
    return id != WeightId::kHead && at(layer).stack_of[index(id)] >= 0;
  }

  // Frees the model's own copies of the matrices this object holds: every quantised linear
  // weight, and an untied head unless it is multiplied from the model (HeadWeights::kModel); a
  // tied head is the embedding table, which the lookup still reads. Why: without it a process
  // decoding through the packed matrices holds the fp32 model beside them (SmolLM2: 538 MB next
  // to 101 MB of INT4). Afterwards the model decodes only through this object (forward_batch,
  // forward_cached, generate, Engine with these weights); its own forward(), a DenseWeights over
  // it, or saving it, would meet empty weights and throw. Returns the bytes freed.
  int64_t release_model_weights(Model& model) const {
    int64_t freed = 0;
    auto release = [&](Tensor<T>& t) {
      freed += t.numel() * static_cast<int64_t>(sizeof(T));
      t = Tensor<T>();
    };
    // A tied head has no name of its own here: it is the embedding table.
    model.visit_parameters([&](std::string_view name, auto& p) {
      if (!quant::is_linear_weight(name) || (name == quant::kHeadName && model_head_ != nullptr)) return;
      release(p.value);
      release(p.grad);
    });
    return freed;
  }

  // Bytes of the matrices a decoded token reads through these products: the attention
  // projections, dense FFNs and head, MoE experts not included (a token reads only the experts
  // it is routed to; expert_bytes() is all of them).
  int64_t bytes() const { return bytes_; }
  int64_t expert_bytes() const { return expert_bytes_; }

 private:
  static constexpr std::size_t index(WeightId id) { return static_cast<std::size_t>(id); }

  struct Stack {
    std::vector<WeightId> ids;
    std::vector<int64_t> rows;  // out features of each id, in order
    Matrix matrix;              // the ids' rows one after the other
  };
  // A block's matrices (an MoE expert's are held the same way, in its FFN slots).
  struct Layer {
    std::array<Matrix, 7> own;          // by WeightId (not kHead); empty when stacked or absent
    std::array<bool, 7> present{};      // the block has this weight
    std::array<int, 7> stack_of{-1, -1, -1, -1, -1, -1, -1};  // index into stacks, or -1
    std::vector<Stack> stacks;
    std::vector<Layer> experts, shared_experts;  // an MoE block's
  };

  static int64_t layer_bytes(const Layer& layer) {
    int64_t b = 0;
    for (std::size_t i = 0; i < layer.own.size(); ++i)
      if (layer.stack_of[i] < 0) b += static_cast<int64_t>(layer.own[i].bytes());
    for (const Stack& st : layer.stacks) b += static_cast<int64_t>(st.matrix.bytes());
    return b;
  }

  static const Matrix& own_matrix(const Layer& ly, int64_t layer, WeightId id) {
    TESSERA_CHECK(ly.present[index(id)], "QuantizedWeights: layer ", layer, " has no ",
                  weight_name(id), " (an MoE block's experts are reached through expert_ffn)");
    TESSERA_CHECK(ly.stack_of[index(id)] < 0, "QuantizedWeights: ", weight_name(id),
                  " of layer ", layer, " is stored stacked with the weights that read the same "
                  "input; use linear() or linear_group()");
    return ly.own[index(id)];
  }

  static Tensor<float> linear_in(const Layer& ly, int64_t layer, WeightId id,
                                 TensorView<const float, Cpu> x) {
    const int s = ly.stack_of[index(id)];
    if (s >= 0) {  // a stacked weight alone (forward_batch asks for the whole group instead)
      const Stack& st = ly.stacks[static_cast<std::size_t>(s)];
      std::vector<Tensor<float>> ys = split(st, product(st.matrix, id, layer, x));
      for (std::size_t i = 0; i < st.ids.size(); ++i)
        if (st.ids[i] == id) return std::move(ys[i]);
    }
    return product(own_matrix(ly, layer, id), id, layer, x);
  }

  static std::vector<Tensor<float>> group_in(const Layer& ly, int64_t layer,
                                             std::span<const WeightId> ids,
                                             TensorView<const float, Cpu> x) {
    if (!ids.empty()) {
      const int s = ly.stack_of[index(ids[0])];
      if (s >= 0) {
        const Stack& st = ly.stacks[static_cast<std::size_t>(s)];
        if (std::equal(ids.begin(), ids.end(), st.ids.begin(), st.ids.end()))
          return split(st, product(st.matrix, ids[0], layer, x));
      }
    }
    std::vector<Tensor<float>> out;
    out.reserve(ids.size());
    for (WeightId id : ids) out.push_back(linear_in(ly, layer, id, x));
    return out;
  }

  const Layer& at(int64_t layer) const {
    TESSERA_CHECK(layer >= 0 && layer < static_cast<int64_t>(layers_.size()),
                  "QuantizedWeights: layer ", layer, " is outside [0, ", layers_.size(), ")");
    return layers_[static_cast<std::size_t>(layer)];
  }

  // Stacks `ids` into one matrix when they can be: same columns and, for AWQ, the same input
  // scales (so one scaled copy of x serves all of them).
  static void stack(Layer& layer, std::initializer_list<WeightId> ids) {
    const Matrix& first = layer.own[index(*ids.begin())];
    for (WeightId id : ids) {
      const Matrix& m = layer.own[index(id)];
      if (m.cols() != first.cols()) return;
      if constexpr (quant::is_awq_v<Format>) {
        if (!std::ranges::equal(m.input_scales_inv(), first.input_scales_inv())) return;
      }
    }
    Stack st;
    int64_t rows = 0;
    std::vector<typename Matrix::Element> data;
    std::vector<float> row_scales;
    for (WeightId id : ids) {
      const Matrix& m = layer.own[index(id)];
      st.ids.push_back(id);
      st.rows.push_back(m.rows());
      rows += m.rows();
      data.insert(data.end(), m.data().begin(), m.data().end());
      row_scales.insert(row_scales.end(), m.row_scales().begin(), m.row_scales().end());
    }
    std::vector<float> in_scales(first.input_scales_inv().begin(), first.input_scales_inv().end());
    st.matrix = Matrix::from_parts(rows, first.cols(), std::move(data), std::move(row_scales),
                                   std::move(in_scales));
    for (WeightId id : ids) {
      layer.stack_of[index(id)] = static_cast<int>(layer.stacks.size());
      layer.own[index(id)] = Matrix();
    }
    layer.stacks.push_back(std::move(st));
  }

  // y = x m^T, x padded with zero columns when m is stored with K rounded up to whole groups
  // (quant::padded_cols).
  static Tensor<float> product(const Matrix& m, WeightId id, int64_t layer,
                               TensorView<const float, Cpu> x) {
    const int64_t in = x.dim(x.rank() - 1);
    if (m.cols() == in) return quant::linear(x, m);
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

  // (rows, sum of outs) -> one (rows, out_i) per id.
  static std::vector<Tensor<float>> split(const Stack& st, const Tensor<float>& y) {
    const int64_t total = st.matrix.rows(), rows = y.numel() / total;
    std::vector<Tensor<float>> out;
    int64_t col = 0;
    for (const int64_t n : st.rows) {
      Tensor<float> t = Tensor<float>::empty(Shape{rows, n});
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(y.data() + r * total + col, n, t.data() + r * n);
      out.push_back(std::move(t));
      col += n;
    }
    return out;
  }

  std::vector<Layer> layers_;
  Matrix head_;
  const Tensor<float>* model_head_ = nullptr;  // HeadWeights::kModel
  int64_t bytes_ = 0, expert_bytes_ = 0;
};

template <class Model, class Format>
QuantizedWeights(Model&, quant::QuantizedLinears<Format>) -> QuantizedWeights<Model, Format>;
template <class Model, class Format>
QuantizedWeights(Model&, quant::QuantizedLinears<Format>, HeadWeights) -> QuantizedWeights<Model, Format>;

}  // namespace tessera::infer
