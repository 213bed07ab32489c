// tessera/nn/parameter.hpp — a layer's trainable tensor and its gradient, side by side.
//
// Why a plain pair and not a richer object: every layer owns its parameters and hands them out
// through visit_parameters(f) as (dotted name, Parameter&). Optimizers, checkpoints and the
// safetensors naming only need the value and the accumulated gradient, so that is all it holds.
// backward ACCUMULATES into grad (so gradient accumulation over micro-batches is free); the
// trainer calls zero_grad() between steps.
#pragma once

#include <algorithm>

#include "tessera/core/tensor.hpp"

namespace tessera::nn {

template <class T>
struct Parameter {
  Tensor<T> value;
  Tensor<T> grad;  // same shape as value

  void zero_grad() {
    if (grad.numel() != value.numel() || grad.shape() != value.shape()) {
      grad = Tensor<T>::zeros(value.shape());
      return;
    }
    std::fill(grad.data(), grad.data() + grad.numel(), T{});
  }
};

}  // namespace tessera::nn
