// tessera/tessera.hpp — the umbrella header: everything a program needs, in one include.
//
// Headers that need an optional dependency (CUDA kernels in kernels/) are not pulled in
// here; they are included by translation units compiled with nvcc.
#pragma once

#include "tessera/version.hpp"

#include "tessera/core/config.hpp"
#include "tessera/core/cpu_features.hpp"
#include "tessera/core/device.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/int4.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/rng.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

#include "tessera/ops/activation.hpp"
#include "tessera/ops/cast.hpp"
#include "tessera/ops/cross_entropy.hpp"
#include "tessera/ops/elementwise.hpp"
#include "tessera/ops/embedding.hpp"
#include "tessera/ops/matmul.hpp"
#include "tessera/ops/norm.hpp"
#include "tessera/ops/rope.hpp"
#include "tessera/ops/softmax.hpp"
#include "tessera/ops/topk.hpp"

#include "tessera/quant/fp8_scaling.hpp"

#include "tessera/io/safetensors.hpp"

#include "tessera/nn/attention.hpp"
#include "tessera/nn/feed_forward.hpp"
#include "tessera/nn/layers.hpp"
#include "tessera/nn/moe.hpp"
#include "tessera/nn/parameter.hpp"
#include "tessera/nn/router.hpp"
#include "tessera/nn/transformer_block.hpp"
#include "tessera/nn/window.hpp"

#include "tessera/models/config.hpp"
#include "tessera/models/decoder.hpp"
#include "tessera/models/encoder.hpp"
#include "tessera/models/trunk.hpp"
#include "tessera/models/weights.hpp"

#include "tessera/train/checkpoint.hpp"
#include "tessera/train/optimizer.hpp"
#include "tessera/train/precision.hpp"
#include "tessera/train/schedule.hpp"
#include "tessera/train/token_data.hpp"
#include "tessera/train/trainer.hpp"
