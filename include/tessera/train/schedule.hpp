// tessera/train/schedule.hpp — learning-rate schedules as small value types: lr(step).
//
// WarmupCosine is the schedule of most LLM pre-training runs (DeepSeek-V3 uses warm-up then a
// long constant phase and a cosine decay; GPT-style runs warm up linearly and decay by a cosine
// to a floor). Steps count from 0: step 0 is the first optimizer update.
//   step < warmup:             peak * (step + 1) / warmup     (never 0: the first step moves)
//   warmup <= step < total:    floor + (peak - floor) * (1 + cos(pi * p)) / 2,
//                              p = (step - warmup) / (total - warmup)
//   step >= total:             floor
// A schedule is a pure function of the step, so a resumed run needs nothing but the step.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>

#include "tessera/core/error.hpp"

namespace tessera::train {

struct ConstantLr {
  double lr = 1e-3;
  double operator()(int64_t) const { return lr; }
};

struct WarmupCosine {
  double peak = 1e-3;
  int64_t warmup = 0;
  int64_t total = 1;
  double floor = 0.0;

  WarmupCosine(double peak_, int64_t warmup_, int64_t total_, double floor_ = 0.0)
      : peak(peak_), warmup(warmup_), total(total_), floor(floor_) {
    TESSERA_CHECK(peak_ > 0 && floor_ >= 0 && floor_ <= peak_, "WarmupCosine: need 0 <= floor (",
                  floor_, ") <= peak (", peak_, ") and peak > 0");
    TESSERA_CHECK(warmup_ >= 0 && total_ >= 1 && warmup_ <= total_, "WarmupCosine: need 0 <= warmup (",
                  warmup_, ") <= total (", total_, ") and total >= 1");
  }

  double operator()(int64_t step) const {
    TESSERA_CHECK(step >= 0, "WarmupCosine: step ", step, " is negative");
    if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
    if (step >= total) return floor;
    const double p = static_cast<double>(step - warmup) / static_cast<double>(total - warmup);
    return floor + (peak - floor) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
  }
};

}  // namespace tessera::train
