// tessera/core/tensor.hpp — owning tensors and non-owning strided views.
//
// Two types, because ownership and shape-juggling are different jobs:
//   Tensor<T, D>      owns a contiguous, row-major, 64-byte aligned buffer. Move-only: a copy
//                     of a large buffer should be written down (`clone()`), never implied.
//   TensorView<T, D>  points into someone's buffer with explicit strides. Slices, transposes
//                     and reshapes are views, so they cost nothing and never allocate.
// Ops take views (a Tensor converts to one implicitly) and return owning Tensors.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "tessera/core/device.hpp"
#include "tessera/core/error.hpp"
#include "tessera/core/memory.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"

namespace tessera {

template <class T, DeviceTag D = Cpu>
class Tensor;

template <class T, DeviceTag D = Cpu>
class TensorView {
 public:
  using value_type = std::remove_const_t<T>;
  using device = D;

  TensorView() = default;
  TensorView(T* data, Shape shape) : data_(data), shape_(shape), strides_(contiguous_strides(shape)) {}
  TensorView(T* data, Shape shape, Strides strides) : data_(data), shape_(shape), strides_(strides) {
    TESSERA_CHECK(shape.rank() == strides.rank(), "TensorView: shape ", shape, " and strides ",
                  strides, " differ in rank");
  }
  // A view of mutable data is also a view of const data.
  // (A template, so that TensorView<const T> does not declare a conversion to itself.)
  template <class U = T>
    requires(!std::is_const_v<U>)
  operator TensorView<const U, D>() const {
    return TensorView<const U, D>(data_, shape_, strides_);
  }

  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  const Strides& strides() const { return strides_; }
  int rank() const { return shape_.rank(); }
  int64_t numel() const { return shape_.numel(); }
  int64_t dim(int axis) const { return shape_.dim(axis); }

  bool is_contiguous() const { return strides_ == contiguous_strides(shape_) || numel() <= 1; }

  // Elements [begin, end) along `axis`; the other axes are untouched.
  TensorView slice(int axis, int64_t begin, int64_t end) const {
    const int a = shape_.axis(axis);
    TESSERA_CHECK(0 <= begin && begin <= end && end <= shape_[a], "slice: range [", begin, ", ",
                  end, ") is out of bounds for axis ", a, " of shape ", shape_);
    Shape s = shape_;
    s[a] = end - begin;
    return TensorView(data_ + begin * strides_[a], s, strides_);
  }

  // Fixes `axis` at `index` and drops it: a (B, T, C) view selected on axis 0 is (T, C).
  TensorView select(int axis, int64_t index) const {
    const int a = shape_.axis(axis);
    TESSERA_CHECK(0 <= index && index < shape_[a], "select: index ", index,
                  " is out of bounds for axis ", a, " of shape ", shape_);
    std::vector<int64_t> dims, steps;
    for (int i = 0; i < rank(); ++i) {
      if (i == a) continue;
      dims.push_back(shape_[i]);
      steps.push_back(strides_[i]);
    }
    return TensorView(data_ + index * strides_[a], Shape(dims), Strides(steps));
  }

  // Swaps two axes; no data moves.
  TensorView transpose(int axis0, int axis1) const {
    const int a = shape_.axis(axis0), b = shape_.axis(axis1);
    Shape s = shape_;
    Strides st = strides_;
    std::swap(s[a], s[b]);
    std::swap(st[a], st[b]);
    return TensorView(data_, s, st);
  }

  // A new shape over the same contiguous elements. One extent may be -1 (inferred).
  TensorView reshape(std::initializer_list<int64_t> dims) const { return reshape(infer(dims)); }
  TensorView reshape(const Shape& shape) const {
    TESSERA_CHECK(is_contiguous(), "reshape: view with shape ", shape_, " and strides ", strides_,
                  " is not contiguous; call contiguous() first");
    TESSERA_CHECK(shape.numel() == numel(), "reshape: cannot view ", numel(), " elements of shape ",
                  shape_, " as shape ", shape, " (", shape.numel(), " elements)");
    return TensorView(data_, shape);
  }

  // Element access by index, CPU only (a Cuda pointer cannot be dereferenced on the host).
  template <class... Index>
  T& operator()(Index... index) const
    requires(std::same_as<D, Cpu> && (std::is_integral_v<Index> && ...))
  {
    return data_[offset({static_cast<int64_t>(index)...})];
  }

  int64_t offset(std::initializer_list<int64_t> index) const {
    TESSERA_CHECK(static_cast<int>(index.size()) == rank(), "index: ", index.size(),
                  " indices given for a tensor of shape ", shape_);
    int64_t off = 0;
    int i = 0;
    for (int64_t idx : index) {
      TESSERA_CHECK(0 <= idx && idx < shape_[i], "index: ", idx, " is out of bounds for axis ", i,
                    " of shape ", shape_);
      off += idx * strides_[i++];
    }
    return off;
  }

  // A contiguous owning copy (the way to materialise a transposed or sliced view).
  Tensor<value_type, D> contiguous() const;

 private:
  Shape infer(std::initializer_list<int64_t> dims) const {
    std::vector<int64_t> d(dims);
    int64_t known = 1;
    int unknown = -1;
    for (size_t i = 0; i < d.size(); ++i) {
      if (d[i] == -1) {
        TESSERA_CHECK(unknown < 0, "reshape: more than one extent is -1");
        unknown = static_cast<int>(i);
      } else {
        known *= d[i];
      }
    }
    if (unknown >= 0) {
      TESSERA_CHECK(known > 0 && numel() % known == 0, "reshape: cannot infer the -1 extent for ",
                    numel(), " elements of shape ", shape_);
      d[unknown] = numel() / known;
    }
    return Shape(d);
  }

  T* data_ = nullptr;
  Shape shape_;
  Strides strides_;
};

template <class T, DeviceTag D>
class Tensor {
 public:
  using value_type = T;
  using device = D;
  static_assert(!std::is_const_v<T> && std::is_trivially_copyable_v<T>,
                "Tensor<T>: T must be a non-const, trivially copyable number type");

  Tensor() = default;  // shape [0]: no elements
  // Zero-filled. Use Tensor::empty when every element is about to be written anyway.
  explicit Tensor(Shape shape) : Tensor(empty(shape)) {
    DeviceMemory<D>::zero(data_, size_bytes());
  }

  static Tensor empty(Shape shape) {
    Tensor t;
    t.shape_ = shape;
    t.data_ = static_cast<T*>(DeviceMemory<D>::allocate(t.size_bytes()));
    // The recompute policies' peak-memory figures count here and in reset() (core/memory.hpp).
    if constexpr (std::same_as<D, Cpu>) {
      if (t.data_) memory::on_allocate(t.size_bytes());
    }
    return t;
  }
  static Tensor zeros(Shape shape) { return Tensor(shape); }
  static Tensor full(Shape shape, T value)
    requires std::same_as<D, Cpu>
  {
    Tensor t = empty(shape);
    std::fill_n(t.data_, t.numel(), value);
    return t;
  }
  static Tensor from(Shape shape, std::span<const T> values)
    requires std::same_as<D, Cpu>
  {
    TESSERA_CHECK(static_cast<int64_t>(values.size()) == shape.numel(), "Tensor::from: ",
                  values.size(), " values given for shape ", shape, " (", shape.numel(),
                  " elements)");
    Tensor t = empty(shape);
    std::copy(values.begin(), values.end(), t.data_);
    return t;
  }
  static Tensor from(Shape shape, std::initializer_list<T> values)
    requires std::same_as<D, Cpu>
  {
    return from(shape, std::span<const T>(values.begin(), values.size()));
  }

  Tensor(Tensor&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), shape_(std::exchange(other.shape_, Shape{0})) {}
  Tensor& operator=(Tensor&& other) noexcept {
    if (this != &other) {
      reset();
      data_ = std::exchange(other.data_, nullptr);
      shape_ = std::exchange(other.shape_, Shape{0});
    }
    return *this;
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor() { reset(); }

  Tensor clone() const {
    Tensor t = empty(shape_);
    copy_bytes<D, D>(t.data_, data_, size_bytes());
    return t;
  }

  // A copy on another device (or the same one).
  template <DeviceTag Other>
  Tensor<T, Other> to() const {
    auto t = Tensor<T, Other>::empty(shape_);
    copy_bytes<Other, D>(t.data(), data_, size_bytes());
    return t;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return shape_.rank(); }
  int64_t numel() const { return shape_.numel(); }
  int64_t dim(int axis) const { return shape_.dim(axis); }
  std::size_t size_bytes() const { return static_cast<std::size_t>(numel()) * sizeof(T); }

  std::span<T> span()
    requires std::same_as<D, Cpu>
  {
    return {data_, static_cast<size_t>(numel())};
  }
  std::span<const T> span() const
    requires std::same_as<D, Cpu>
  {
    return {data_, static_cast<size_t>(numel())};
  }

  TensorView<T, D> view() { return {data_, shape_}; }
  TensorView<const T, D> view() const { return {data_, shape_}; }
  operator TensorView<T, D>() { return view(); }
  operator TensorView<const T, D>() const { return view(); }

  // View shortcuts, so `x.slice(0, 2, 4)` reads the same on a Tensor and on a view.
  TensorView<T, D> slice(int axis, int64_t b, int64_t e) { return view().slice(axis, b, e); }
  TensorView<const T, D> slice(int axis, int64_t b, int64_t e) const { return view().slice(axis, b, e); }
  TensorView<T, D> select(int axis, int64_t i) { return view().select(axis, i); }
  TensorView<const T, D> select(int axis, int64_t i) const { return view().select(axis, i); }
  TensorView<T, D> transpose(int a, int b) { return view().transpose(a, b); }
  TensorView<const T, D> transpose(int a, int b) const { return view().transpose(a, b); }
  TensorView<T, D> reshape(std::initializer_list<int64_t> d) { return view().reshape(d); }
  TensorView<const T, D> reshape(std::initializer_list<int64_t> d) const { return view().reshape(d); }
  TensorView<T, D> reshape(const Shape& s) { return view().reshape(s); }
  TensorView<const T, D> reshape(const Shape& s) const { return view().reshape(s); }

  template <class... Index>
  T& operator()(Index... index)
    requires(std::same_as<D, Cpu> && (std::is_integral_v<Index> && ...))
  {
    return view()(index...);
  }
  template <class... Index>
  const T& operator()(Index... index) const
    requires(std::same_as<D, Cpu> && (std::is_integral_v<Index> && ...))
  {
    return view()(index...);
  }

 private:
  void reset() {
    if (data_) {
      DeviceMemory<D>::release(data_, size_bytes());
      if constexpr (std::same_as<D, Cpu>) memory::on_release(size_bytes());
    }
    data_ = nullptr;
  }

  T* data_ = nullptr;
  Shape shape_{0};  // empty (and moved-from) tensors hold no elements, unlike a rank-0 scalar
};

// Copies `src` into `dst` element by element, following both views' strides.
template <class T>
void copy(TensorView<const T, Cpu> src, TensorView<T, Cpu> dst) {
  check_same_shape("copy", "src", src.shape(), "dst", dst.shape());
  const int r = src.rank();
  const int64_t n = src.numel();
  if (src.is_contiguous() && dst.is_contiguous()) {
    std::copy_n(src.data(), n, dst.data());
    return;
  }
  std::array<int64_t, Shape::kMaxRank> idx{};
  for (int64_t i = 0; i < n; ++i) {
    int64_t so = 0, d_o = 0;
    for (int a = 0; a < r; ++a) {
      so += idx[a] * src.strides()[a];
      d_o += idx[a] * dst.strides()[a];
    }
    dst.data()[d_o] = src.data()[so];
    for (int a = r - 1; a >= 0; --a) {  // odometer increment, last axis fastest
      if (++idx[a] < src.shape()[a]) break;
      idx[a] = 0;
    }
  }
}

template <class T, DeviceTag D>
Tensor<typename TensorView<T, D>::value_type, D> TensorView<T, D>::contiguous() const {
  using V = value_type;
  auto out = Tensor<V, D>::empty(shape_);
  if constexpr (std::same_as<D, Cpu>) {
    copy<V>(TensorView<const V, Cpu>(data_, shape_, strides_), out.view());
  } else {
    TESSERA_CHECK(is_contiguous(), "contiguous: strided Cuda views are copied by kernels, not here");
    copy_bytes<D, D>(out.data(), data_, out.size_bytes());
  }
  return out;
}

// Prints the shape, the type and up to `limit` leading values (CPU tensors only).
template <class T>
std::ostream& operator<<(std::ostream& out, const Tensor<T, Cpu>& t) {
  out << "Tensor<" << number_traits<T>::name << ">" << t.shape() << " {";
  const int64_t limit = 8;
  for (int64_t i = 0; i < std::min(t.numel(), limit); ++i)
    out << (i ? ", " : "") << to_float(t.data()[i]);
  if (t.numel() > limit) out << ", ...";
  return out << "}";
}

}  // namespace tessera
