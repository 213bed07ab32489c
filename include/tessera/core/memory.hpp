// tessera/core/memory.hpp — a process-wide count of the bytes held by live CPU tensors, and its
// high-water mark.
//
// Why: the activation-recompute policies (nn/transformer_block.hpp) trade compute for memory,
// and the only honest way to show the trade is to count what a training step actually holds.
// Every CPU Tensor's storage goes through Tensor::empty and Tensor::reset (core/tensor.hpp),
// which report here, so the count is exact for tensors. It leaves out what is not a Tensor:
// std::vector side state (routing orders, window choices), the allocator's own caches, and
// the BLAS libraries' work buffers.
//
// Cost: one relaxed atomic add per allocation and per release, and a compare against the peak
// (a compare-exchange only while the peak rises). Nothing here changes what is allocated.
//
//   ts::memory::reset_peak();                 // peak := bytes live now
//   ... forward, backward ...
//   int64_t high = ts::memory::peak_bytes();  // the most that was live at once since
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace tessera::memory {

namespace detail {
// Inline variables: one counter per process however many translation units include this.
inline std::atomic<int64_t> live_bytes{0};
inline std::atomic<int64_t> peak_bytes{0};
}  // namespace detail

inline void on_allocate(std::size_t bytes) {
  const int64_t now =
      detail::live_bytes.fetch_add(static_cast<int64_t>(bytes), std::memory_order_relaxed) +
      static_cast<int64_t>(bytes);
  int64_t peak = detail::peak_bytes.load(std::memory_order_relaxed);
  while (now > peak &&
         !detail::peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

inline void on_release(std::size_t bytes) {
  detail::live_bytes.fetch_sub(static_cast<int64_t>(bytes), std::memory_order_relaxed);
}

// Bytes held by CPU tensors alive now.
inline int64_t live_bytes() { return detail::live_bytes.load(std::memory_order_relaxed); }

// The largest live_bytes() seen since the last reset_peak() (or since the process started).
inline int64_t peak_bytes() { return detail::peak_bytes.load(std::memory_order_relaxed); }

// Restarts the high-water mark from what is live now, so the next peak_bytes() measures one
// region of code (peak_bytes() - live_bytes() at the reset is what that region added).
inline void reset_peak() {
  detail::peak_bytes.store(detail::live_bytes.load(std::memory_order_relaxed),
                           std::memory_order_relaxed);
}

}  // namespace tessera::memory
