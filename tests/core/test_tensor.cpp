// Tensor and TensorView: ownership, alignment, views (slice, select, transpose, reshape),
// strided copies and the errors a caller gets for bad shapes and indices.
#define BOOST_TEST_MODULE tensor
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <numeric>
#include <string>

#include "tessera/core/tensor.hpp"

using namespace tessera;

namespace {
// Fills t with 0, 1, 2, ... so each element's value is its row-major offset.
Tensor<float> iota(Shape s) {
  auto t = Tensor<float>::empty(s);
  std::iota(t.data(), t.data() + t.numel(), 0.0f);
  return t;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

BOOST_AUTO_TEST_CASE(shape_basics) {
  Shape s{2, 3, 4};
  BOOST_TEST(s.rank() == 3);
  BOOST_TEST(s.numel() == 24);
  BOOST_TEST(s[-1] == 4);
  BOOST_TEST(s.str() == "[2, 3, 4]");
  BOOST_TEST(Shape().numel() == 1);  // a scalar holds one element
  Strides st = contiguous_strides(s);
  BOOST_TEST(st[0] == 12);
  BOOST_TEST(st[1] == 4);
  BOOST_TEST(st[2] == 1);
  BOOST_CHECK_THROW(s.dim(3), Error);
  BOOST_CHECK_THROW((Shape{1, 2, 3, 4, 5, 6, 7}), Error);
  BOOST_CHECK_THROW((Shape{2, -1}), Error);
}

BOOST_AUTO_TEST_CASE(owning_tensor_is_zeroed_aligned_and_move_only) {
  for (int64_t n : {1, 5, 7, 13, 64, 1000}) {
    Tensor<float> t(Shape{n});
    BOOST_TEST(reinterpret_cast<std::uintptr_t>(t.data()) % kTensorAlignment == 0u);
    for (float v : t.span()) BOOST_TEST(v == 0.0f);
  }
  static_assert(!std::is_copy_constructible_v<Tensor<float>>);
  static_assert(std::is_nothrow_move_constructible_v<Tensor<float>>);

  Tensor<float> a = iota({2, 3});
  const float* p = a.data();
  Tensor<float> b = std::move(a);
  BOOST_TEST(b.data() == p);  // moved, not copied
  BOOST_TEST(a.data() == nullptr);
  BOOST_TEST(a.numel() == 0);  // a moved-from tensor holds nothing
  BOOST_TEST(Tensor<float>().numel() == 0);
  auto scalar = Tensor<float>::full(Shape{}, 2.5f);  // rank 0 holds exactly one element
  BOOST_TEST(scalar.numel() == 1);
  BOOST_TEST(scalar.data()[0] == 2.5f);

  Tensor<float> c = b.clone();
  BOOST_TEST(c.data() != b.data());
  c(1, 2) = 100.0f;
  BOOST_TEST(b(1, 2) == 5.0f);  // the clone is independent
}

BOOST_AUTO_TEST_CASE(from_and_full) {
  auto t = Tensor<double>::from({2, 2}, {1.0, 2.0, 3.0, 4.0});
  BOOST_TEST(t(1, 0) == 3.0);
  auto f = Tensor<int32_t>::full({3}, 7);
  BOOST_TEST(f(2) == 7);
  const std::string msg = error_of([] { Tensor<float>::from({2, 2}, {1.0f, 2.0f, 3.0f}); });
  BOOST_TEST(msg.find("3 values given for shape [2, 2]") != std::string::npos, msg);
}

BOOST_AUTO_TEST_CASE(slice_select_transpose_reshape) {
  const auto t = iota({3, 4, 5});  // value at (i, j, k) is 20i + 5j + k
  auto s = t.slice(1, 1, 3);       // (3, 2, 5)
  BOOST_TEST(s.shape() == (Shape{3, 2, 5}));
  BOOST_TEST(s(2, 1, 4) == 20 * 2 + 5 * 2 + 4);
  BOOST_TEST(!s.is_contiguous());

  auto row = t.select(0, 2);  // (4, 5)
  BOOST_TEST(row(3, 1) == 40 + 15 + 1);
  BOOST_TEST(row.is_contiguous());

  auto tr = t.transpose(0, 2);  // (5, 4, 3)
  BOOST_TEST(tr.shape() == (Shape{5, 4, 3}));
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t k = 0; k < 5; ++k) BOOST_TEST(tr(k, j, i) == t(i, j, k));

  auto r = t.reshape({-1, 10});  // (6, 10)
  BOOST_TEST(r.shape() == (Shape{6, 10}));
  BOOST_TEST(r(5, 9) == 59.0f);

  // A transposed view is not contiguous: reshape must refuse, contiguous() must copy.
  const std::string msg = error_of([&] { (void)tr.reshape({60}); });
  BOOST_TEST(msg.find("not contiguous") != std::string::npos, msg);
  auto c = tr.contiguous();
  BOOST_TEST(c.shape() == (Shape{5, 4, 3}));
  auto flat = c.reshape({60});
  // Element (k, j, i) of the transposed copy sits at offset 12k + 3j + i and holds 20i + 5j + k.
  BOOST_TEST(flat(12 * 4 + 3 * 1 + 2) == 20 * 2 + 5 * 1 + 4);

  BOOST_CHECK_THROW((void)t.reshape({7, -1}), Error);
  BOOST_CHECK_THROW((void)t.slice(1, 2, 5), Error);
  BOOST_CHECK_THROW((void)t.select(0, 3), Error);
}

BOOST_AUTO_TEST_CASE(strided_copy_into_a_view) {
  auto dst = Tensor<float>::zeros({4, 6});
  const auto src = iota({2, 3});
  // Write the (2, 3) block into rows 1..2, columns 2..4 of dst.
  copy<float>(src.view(), dst.slice(0, 1, 3).slice(1, 2, 5));
  BOOST_TEST(dst(1, 2) == 0.0f);
  BOOST_TEST(dst(2, 4) == 5.0f);
  BOOST_TEST(dst(0, 0) == 0.0f);
  BOOST_TEST(dst(3, 5) == 0.0f);
  float sum = 0;
  for (float v : dst.span()) sum += v;
  BOOST_TEST(sum == 15.0f);  // 0 + 1 + ... + 5, nothing written outside the block
  BOOST_CHECK_THROW(copy<float>(src.view(), dst.view()), Error);
}

BOOST_AUTO_TEST_CASE(index_errors_name_the_axis_and_shape) {
  auto t = iota({2, 3});
  const std::string msg = error_of([&] { (void)t(1, 3); });
  BOOST_TEST(msg.find("index: 3 is out of bounds for axis 1 of shape [2, 3]") != std::string::npos,
             msg);
  const std::string shape_msg = error_of([] { check_shape("rmsnorm", "weight", Shape{5}, Shape{7}); });
  BOOST_TEST(shape_msg == "rmsnorm: tensor 'weight' has shape [5], expected [7]");
}

BOOST_AUTO_TEST_CASE(cpu_to_cpu_transfer_copies) {
  auto t = iota({3, 3});
  auto u = t.to<Cpu>();
  BOOST_TEST(u.data() != t.data());
  BOOST_TEST(u(2, 2) == 8.0f);
}

BOOST_AUTO_TEST_CASE(large_buffers_are_reused_not_refaulted) {
  auto& cache = detail::LargeBlockCache::instance();
  cache.release_all();
  const Shape big{1 << 19};  // 2 MiB of floats: above the caching threshold
  const float* first = nullptr;
  {
    Tensor<float> t(big);
    first = t.data();
    t(7) = 3.0f;
  }
  BOOST_TEST(cache.cached_bytes() == size_t{2} << 20);
  Tensor<float> again(big);  // same size: the cached block comes back, zero-filled
  BOOST_TEST(again.data() == first);
  BOOST_TEST(again(7) == 0.0f);
  BOOST_TEST(cache.cached_bytes() == 0u);
  {
    Tensor<float> small(Shape{1000});  // below the threshold: never cached
  }
  BOOST_TEST(cache.cached_bytes() == 0u);
  BOOST_TEST(reinterpret_cast<std::uintptr_t>(again.data()) % kTensorAlignment == 0u);
}
