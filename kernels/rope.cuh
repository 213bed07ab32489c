// kernels/rope.cuh — rotary position embedding on the GPU, forward and backward; the CUDA twin
// of tessera/ops/rope.hpp, with the same shapes, layouts and position conventions.
//
// How it is built, and why:
//   * The cos/sin table is the CPU's: a cuda::RopeTable<Acc> is made from an ops::RopeTable<Acc>
//     (computed once, in double, on the host; see rope.hpp for why the angles need double) and
//     holds device copies of its (max_positions, rotary_dim/2) cos and sin. Building it costs
//     two host-to-device copies; every layer and every step then reuses it. Computing the table
//     on the device would need double-precision sin/cos of large angles there too, for no gain.
//   * One thread per rotating pair (and per pass-through feature beyond rotary_dim), so a
//     thread reads two inputs and one cos/sin pair and writes two outputs: memory-bound, and
//     adjacent threads touch adjacent features (half-split layout) or adjacent pairs
//     (interleaved layout), so loads coalesce.
//   * Backward is the same kernel with the sine negated (the transpose of a rotation), as on
//     the CPU.
//   * Arithmetic in float (double when x or the table is double), each output rounded once;
//     it can differ from the CPU in the last bit because nvcc contracts a*c - b*s into an FMA.
//   * Positions given as a tensor are checked on the device: an out-of-range position is
//     reported (the first one, by flat index) and the call throws, naming the element and its
//     value; this costs one tiny read-back and a stream synchronisation per call. The start
//     offset form (KV-cache decoding) is checked on the host and costs nothing.
//
// Shapes: x is (batch, seq, heads, head_dim) or (seq, heads, head_dim); positions are (seq)
// or (batch, seq), int32, on the device.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/common.cuh"
#include "tessera/ops/rope.hpp"

namespace tessera::cuda {

using ops::RopeLayout;

// Device copy of an ops::RopeTable (see the file header).
template <class Acc = float>
class RopeTable {
  static_assert(std::is_same_v<Acc, float> || std::is_same_v<Acc, double>,
                "cuda::RopeTable<Acc>: Acc must be float or double");

 public:
  explicit RopeTable(const ops::RopeTable<Acc>& host)
      : layout_(host.layout()),
        head_dim_(host.head_dim()),
        rotary_dim_(host.rotary_dim()),
        max_positions_(host.max_positions()),
        cos_(host.cos().template to<Cuda>()),
        sin_(host.sin().template to<Cuda>()) {}

  RopeLayout layout() const { return layout_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t rotary_dim() const { return rotary_dim_; }
  int64_t max_positions() const { return max_positions_; }
  const Tensor<Acc, Cuda>& cos() const { return cos_; }  // (max_positions, rotary_dim/2)
  const Tensor<Acc, Cuda>& sin() const { return sin_; }  // (max_positions, rotary_dim/2)

 private:
  RopeLayout layout_;
  int64_t head_dim_;
  int64_t rotary_dim_;
  int64_t max_positions_;
  Tensor<Acc, Cuda> cos_;
  Tensor<Acc, Cuda> sin_;
};

namespace rope_detail {

struct Dims {
  int64_t batch, seq, heads, head_dim;
};

// Where the positions come from: positions[s] (per_batch false), positions[b * seq + s]
// (per_batch true), or start + s (positions null).
struct Positions {
  const int32_t* data;
  int64_t start;
  bool per_batch;
};

template <class T, class Acc>
__global__ void rope_kernel(const T* __restrict__ x, const Acc* __restrict__ cos_tab,
                            const Acc* __restrict__ sin_tab, Dims d, int64_t rotary_dim,
                            int64_t max_positions, bool interleaved, bool inverse, Positions pos,
                            unsigned long long* bad_position, T* __restrict__ out) {
  using C = std::conditional_t<std::is_same_v<acc_t<T>, double> || std::is_same_v<Acc, double>,
                               double, float>;
  const int64_t pairs = rotary_dim / 2;
  const int64_t per_head = pairs + (d.head_dim - rotary_dim);  // work items per head
  const int64_t total = d.batch * d.seq * d.heads * per_head;
  for (int64_t w = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; w < total;
       w += int64_t{gridDim.x} * blockDim.x) {
    const int64_t item = w % per_head;
    const int64_t head_row = w / per_head;   // (b * seq + s) * heads + h
    const int64_t row = head_row / d.heads;  // b * seq + s
    const int64_t base = head_row * d.head_dim;
    if (item >= pairs) {  // partial rotary: features beyond rotary_dim pass through
      const int64_t j = rotary_dim + (item - pairs);
      out[base + j] = x[base + j];
      continue;
    }
    int64_t p;
    if (pos.data == nullptr) {
      p = pos.start + row % d.seq;
    } else {
      const int64_t flat = pos.per_batch ? row : row % d.seq;
      p = pos.data[flat];
      if (p < 0 || p >= max_positions) {
        report_bad_index(bad_position, flat);
        continue;
      }
    }
    const int64_t i = item;
    const int64_t i0 = interleaved ? 2 * i : i;
    const int64_t i1 = interleaved ? 2 * i + 1 : i + pairs;
    const C a = load_acc<C>(x[base + i0]), b = load_acc<C>(x[base + i1]);
    const C c = static_cast<C>(cos_tab[p * pairs + i]);
    const C s =
        inverse ? -static_cast<C>(sin_tab[p * pairs + i]) : static_cast<C>(sin_tab[p * pairs + i]);
    out[base + i0] = store_acc<T, C>(a * c - b * s);
    out[base + i1] = store_acc<T, C>(b * c + a * s);
  }
}

template <class Acc>
Dims check_input(const char* op, const char* name, const Shape& s, const RopeTable<Acc>& table) {
  TESSERA_CHECK(s.rank() == 3 || s.rank() == 4, op, ": tensor '", name,
                "' must be (batch, seq, heads, head_dim) or (seq, heads, head_dim), got shape ", s);
  TESSERA_CHECK(s[-1] == table.head_dim(), op, ": tensor '", name, "' has head_dim ", s[-1],
                " (shape ", s, "), but the RopeTable was built for head_dim ", table.head_dim());
  return s.rank() == 4 ? Dims{s[0], s[1], s[2], s[3]} : Dims{1, s[0], s[1], s[2]};
}

template <class T, class Acc>
Tensor<T, Cuda> launch(const Dense<T>& x, const Shape& shape, const RopeTable<Acc>& table,
                       const Dims& d, Positions pos, bool inverse, unsigned long long* bad,
                       cudaStream_t stream) {
  auto out = Tensor<T, Cuda>::empty(shape);
  const int64_t rd = table.rotary_dim();
  const int64_t total = d.batch * d.seq * d.heads * (rd / 2 + d.head_dim - rd);
  if (total == 0) return out;
  rope_kernel<T, Acc><<<grid_for(total), kThreadsPerBlock, 0, stream>>>(
      x.data, table.cos().data(), table.sin().data(), d, rd, table.max_positions(),
      table.layout() == RopeLayout::kInterleaved, inverse, pos, bad, out.data());
  TESSERA_CUDA_CHECK_LAUNCH("rope_kernel");
  return out;
}

template <class T, class Acc>
Tensor<T, Cuda> run(const char* op, const char* name, TensorView<const T, Cuda> x,
                    const RopeTable<Acc>& table, TensorView<const int32_t, Cuda> positions,
                    bool inverse, cudaStream_t stream) {
  const Dims d = check_input(op, name, x.shape(), table);
  const Shape& ps = positions.shape();
  const bool per_batch = ps.rank() == 2;
  const bool shape_ok = (ps.rank() == 1 && ps[0] == d.seq) ||
                        (per_batch && x.rank() == 4 && ps == Shape{d.batch, d.seq});
  TESSERA_CHECK(shape_ok, op, ": tensor 'positions' has shape ", ps, ", expected [", d.seq, "]",
                x.rank() == 4
                    ? " or [" + std::to_string(d.batch) + ", " + std::to_string(d.seq) + "]"
                    : std::string(),
                " for '", name, "' of shape ", x.shape());
  const Dense<T> xd(x, stream);
  const Dense<int32_t> pd(positions, stream);
  BadIndexFlag bad(stream);
  auto out = launch<T, Acc>(xd, x.shape(), table, d, Positions{pd.data, 0, per_batch}, inverse,
                            bad.device(), stream);
  if (const unsigned long long first = bad.read(); first != BadIndexFlag::kNone) {
    const auto flat = static_cast<int64_t>(first);
    fail(op, ": positions", index_str(flat, ps), " = ", read_element(pd.data, flat, stream),
         " is outside the RopeTable's positions [0, ", table.max_positions(),
         "); build the table with a larger max_positions");
  }
  return out;
}

template <class T, class Acc>
Tensor<T, Cuda> run(const char* op, const char* name, TensorView<const T, Cuda> x,
                    const RopeTable<Acc>& table, int64_t start, bool inverse, cudaStream_t stream) {
  const Dims d = check_input(op, name, x.shape(), table);
  TESSERA_CHECK(start >= 0 && start + d.seq <= table.max_positions(), op, ": positions [", start,
                ", ", start + d.seq, ") of '", name, "' (shape ", x.shape(), ", start offset ",
                start, ") are outside the RopeTable's positions [0, ", table.max_positions(),
                "); build the table with a larger max_positions");
  const Dense<T> xd(x, stream);
  return launch<T, Acc>(xd, x.shape(), table, d, Positions{nullptr, start, false}, inverse, nullptr,
                        stream);
}

}  // namespace rope_detail

// Rotates x (batch, seq, heads, head_dim) or (seq, heads, head_dim); token (b, s) sits at
// positions[s] (positions of shape (seq)) or positions[b, s] (shape (batch, seq)).
template <class T, class Acc>
Tensor<T, Cuda> rope(TensorView<const T, Cuda> x, const RopeTable<Acc>& table,
                     TensorView<const int32_t, Cuda> positions, cudaStream_t stream = nullptr) {
  return rope_detail::run<T, Acc>("rope", "x", x, table, positions, false, stream);
}

// Token s of every batch row sits at position start + s (KV-cache decoding).
template <class T, class Acc>
Tensor<T, Cuda> rope(TensorView<const T, Cuda> x, const RopeTable<Acc>& table, int64_t start = 0,
                     cudaStream_t stream = nullptr) {
  return rope_detail::run<T, Acc>("rope", "x", x, table, start, false, stream);
}

// dx = the transpose of rope applied to dout: rotation by the negative angle.
template <class T, class Acc>
Tensor<T, Cuda> rope_backward(TensorView<const T, Cuda> dout, const RopeTable<Acc>& table,
                              TensorView<const int32_t, Cuda> positions,
                              cudaStream_t stream = nullptr) {
  return rope_detail::run<T, Acc>("rope_backward", "dout", dout, table, positions, true, stream);
}

template <class T, class Acc>
Tensor<T, Cuda> rope_backward(TensorView<const T, Cuda> dout, const RopeTable<Acc>& table,
                              int64_t start = 0, cudaStream_t stream = nullptr) {
  return rope_detail::run<T, Acc>("rope_backward", "dout", dout, table, start, true, stream);
}

}  // namespace tessera::cuda
