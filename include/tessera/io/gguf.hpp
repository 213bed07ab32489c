// tessera/io/gguf.hpp — read GGUF files (llama.cpp's model format): metadata, tensor index,
// and dequantisation of the F32, F16, BF16, Q4_0, Q4_1, Q8_0 and Q4_K tensor formats to fp32.
//
// The format (version 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor count,
// u64 key/value count; the key/values (string key, u32 value type, value; a string is a u64
// length and that many bytes; an array is a u32 element type, a u64 count and the elements);
// the tensor infos (string name, u32 n_dims, n_dims u64 extents with the fastest-varying first,
// u32 ggml type, u64 offset into the data section); padding to `general.alignment` (default
// 32); the data section.
//
// Why so many checks: GGUF files are downloaded from model hubs, so every file is untrusted.
// llama.cpp's reader has had a run of memory-safety bugs from crafted files, and each class of
// them is refused here with a tessera::Error that names the file, the key or tensor, and the
// bad value (docs/gguf.md lists them; tests/io/test_gguf.cpp has one regression test each):
//   * array element types are validated before anything is read or cast: an unknown type, a
//     nested array, a bool byte other than 0/1 are refused;
//   * every size and offset is computed with overflow checks (extents x element size, offset +
//     size, the alignment padding), offsets must be multiples of the alignment, which must be a
//     power of two, and every tensor must lie inside the data section without overlapping
//     another;
//   * no count read from the file is trusted for an allocation: a string, an array, the key and
//     tensor tables must each fit in the bytes that remain (each element takes at least its
//     minimum encoded size), so the largest allocation is bounded by the file's own size;
//   * duplicate keys and tensor names are refused (two readers could pick different ones).
// Model-level checks (layer and head counts in range, token ids within the vocabulary, byte
// tokens present) belong to the code that interprets the metadata: models/llama.hpp and
// io/gguf_tokenizer.hpp.
//
// Dequantisation equals the `gguf` Python package's (gguf-py in llama.cpp) bit for bit: each
// format's arithmetic is done in float32 in the same order as its numpy code (for Q4_1, a
// product then a sum, never fused: see fp32_mul_add). tests/io checks every tensor of the real
// SmolLM2 file and synthetic files of every supported format against it.
//
// What it offers:
//   GgufFile::open(path) / from_memory(bytes)   parse and validate (the whole file is read)
//   file.metadata() / find(key) / get_u64 / get_f64 / get_string / get_bool / strings(key)
//   file.tensors() / tensor(name)              name, ggml type, extents, offset, size
//   file.raw(name)                             the tensor's bytes
//   file.dequantize(name)                      Tensor<float> in row-major (reversed) shape
//   dequantize_row(type, bytes, n, out)        one run of blocks to fp32
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::io {

static_assert(std::endian::native == std::endian::little,
              "tessera's GGUF reader copies little-endian values verbatim");

// ---- ggml tensor types ------------------------------------------------------------------------

// The numbering of ggml's `enum ggml_type`. Every type known here can be laid out and
// validated; dequantize() supports the ones with `dequantizable` set.
enum class GgmlType : std::uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10,
  Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, IQ2_XXS = 16, IQ2_XS = 17,
  IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23, I8 = 24, I16 = 25,
  I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30
};

struct GgmlTypeTraits {
  std::string_view name;
  std::int64_t block = 0;       // elements per block
  std::int64_t block_bytes = 0; // bytes per block
  bool dequantizable = false;
};

// Block structs of the supported quantised formats (as ggml-common.h declares them); each
// asserts its size so a layout slip cannot go unnoticed.
struct BlockQ4_0 { std::uint16_t d; std::uint8_t qs[16]; };
struct BlockQ4_1 { std::uint16_t d, m; std::uint8_t qs[16]; };
struct BlockQ8_0 { std::uint16_t d; std::int8_t qs[32]; };
struct BlockQ4_K { std::uint16_t d, dmin; std::uint8_t scales[12]; std::uint8_t qs[128]; };
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ8_0) == 34 &&
              sizeof(BlockQ4_K) == 144);

// nullopt for a number that is not a ggml type (or one of the removed/unsupported layouts).
inline std::optional<GgmlTypeTraits> ggml_type_traits(std::uint32_t type) {
  constexpr std::int64_t K = 256;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32: return GgmlTypeTraits{"F32", 1, 4, true};
    case GgmlType::F16: return GgmlTypeTraits{"F16", 1, 2, true};
    case GgmlType::BF16: return GgmlTypeTraits{"BF16", 1, 2, true};
    case GgmlType::Q4_0: return GgmlTypeTraits{"Q4_0", 32, 18, true};
    case GgmlType::Q4_1: return GgmlTypeTraits{"Q4_1", 32, 20, true};
    case GgmlType::Q8_0: return GgmlTypeTraits{"Q8_0", 32, 34, true};
    case GgmlType::Q4_K: return GgmlTypeTraits{"Q4_K", K, 144, true};
    case GgmlType::Q5_0: return GgmlTypeTraits{"Q5_0", 32, 22, false};
    case GgmlType::Q5_1: return GgmlTypeTraits{"Q5_1", 32, 24, false};
    case GgmlType::Q8_1: return GgmlTypeTraits{"Q8_1", 32, 40, false};
    case GgmlType::Q2_K: return GgmlTypeTraits{"Q2_K", K, 2 + 2 + K / 16 + K / 4, false};
    case GgmlType::Q3_K: return GgmlTypeTraits{"Q3_K", K, 2 + K / 4 + K / 8 + 12, false};
    case GgmlType::Q5_K: return GgmlTypeTraits{"Q5_K", K, 2 + 2 + K / 2 + K / 8 + 12, false};
    case GgmlType::Q6_K: return GgmlTypeTraits{"Q6_K", K, 2 + K / 2 + K / 4 + K / 16, false};
    case GgmlType::Q8_K: return GgmlTypeTraits{"Q8_K", K, 4 + K + K / 8, false};
    case GgmlType::IQ2_XXS: return GgmlTypeTraits{"IQ2_XXS", K, 2 + K / 4, false};
    case GgmlType::IQ2_XS: return GgmlTypeTraits{"IQ2_XS", K, 2 + K / 4 + K / 32, false};
    case GgmlType::IQ3_XXS: return GgmlTypeTraits{"IQ3_XXS", K, 2 + K / 4 + K / 8, false};
    case GgmlType::IQ1_S: return GgmlTypeTraits{"IQ1_S", K, 2 + K / 8 + K / 16, false};
    case GgmlType::IQ4_NL: return GgmlTypeTraits{"IQ4_NL", 32, 18, false};
    case GgmlType::IQ3_S: return GgmlTypeTraits{"IQ3_S", K, 2 + K / 4 + K / 8 + K / 32 + 4, false};
    case GgmlType::IQ2_S: return GgmlTypeTraits{"IQ2_S", K, 2 + K / 4 + K / 16, false};
    case GgmlType::IQ4_XS: return GgmlTypeTraits{"IQ4_XS", K, 2 + 2 + K / 2 + K / 64, false};
    case GgmlType::I8: return GgmlTypeTraits{"I8", 1, 1, false};
    case GgmlType::I16: return GgmlTypeTraits{"I16", 1, 2, false};
    case GgmlType::I32: return GgmlTypeTraits{"I32", 1, 4, false};
    case GgmlType::I64: return GgmlTypeTraits{"I64", 1, 8, false};
    case GgmlType::F64: return GgmlTypeTraits{"F64", 1, 8, false};
    case GgmlType::IQ1_M: return GgmlTypeTraits{"IQ1_M", K, K / 8 + K / 16 + K / 32, false};
  }
  return std::nullopt;
}

inline std::string ggml_type_name(GgmlType t) {
  const auto tr = ggml_type_traits(static_cast<std::uint32_t>(t));
  return tr ? std::string(tr->name) : "type " + std::to_string(static_cast<std::uint32_t>(t));
}

// ---- dequantisation -----------------------------------------------------------------------------

namespace gguf_detail {

inline float half_to_float(std::uint16_t bits) { return to_float(fp16::from_bits(bits)); }

// a * b + c with two float roundings, as numpy computes `(d * q) + m`. A fused multiply-add
// would round once and differ in the last bit; GCC may contract across statements when FMA
// is enabled (-march=native), so contraction is switched off for this function.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
inline float fp32_mul_add(float a, float b, float c) {
  const float p = a * b;
  return p + c;
}
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
inline float fp32_mul_sub(float a, float b, float c) {
  const float p = a * b;
  return p - c;
}

inline std::uint16_t load_u16(const std::byte* p) {
  std::uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace gguf_detail

// Dequantises `n` elements of type `type` stored in `bytes` (whole blocks) into out[0, n).
inline void dequantize_row(GgmlType type, std::span<const std::byte> bytes, std::int64_t n,
                           float* out) {
  using namespace gguf_detail;
  const auto traits = ggml_type_traits(static_cast<std::uint32_t>(type));
  TESSERA_CHECK(traits.has_value(), "dequantize_row: unknown ggml type ",
                static_cast<std::uint32_t>(type));
  TESSERA_CHECK(traits->dequantizable, "dequantize_row: ggml type ", traits->name,
                " is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K)");
  TESSERA_CHECK(n >= 0 && n % traits->block == 0, "dequantize_row: ", n,
                " elements are not a whole number of ", traits->name, " blocks of ",
                traits->block);
  const std::int64_t blocks = n / traits->block;
  TESSERA_CHECK(static_cast<std::uint64_t>(blocks) * static_cast<std::uint64_t>(traits->block_bytes) ==
                    bytes.size(),
                "dequantize_row: ", n, " ", traits->name, " elements need ",
                blocks * traits->block_bytes, " bytes, got ", bytes.size());
  if (n == 0) return;  // an empty tensor's span and output may both be null
  const std::byte* p = bytes.data();
  switch (type) {
    case GgmlType::F32:
      std::memcpy(out, p, static_cast<std::size_t>(n) * 4);
      return;
    case GgmlType::F16:
      for (std::int64_t i = 0; i < n; ++i) out[i] = half_to_float(load_u16(p + 2 * i));
      return;
    case GgmlType::BF16:
      for (std::int64_t i = 0; i < n; ++i) out[i] = to_float(bf16::from_bits(load_u16(p + 2 * i)));
      return;
    case GgmlType::Q4_0:
      for (std::int64_t b = 0; b < blocks; ++b, out += 32) {
        BlockQ4_0 blk;
        std::memcpy(&blk, p + b * 18, 18);
        const float d = half_to_float(blk.d);
        for (int j = 0; j < 16; ++j) {  // low nibbles are elements 0..15, high ones 16..31
          out[j] = d * static_cast<float>(static_cast<int>(blk.qs[j] & 0x0F) - 8);
          out[j + 16] = d * static_cast<float>(static_cast<int>(blk.qs[j] >> 4) - 8);
        }
      }
      return;
    case GgmlType::Q4_1:
      for (std::int64_t b = 0; b < blocks; ++b, out += 32) {
        BlockQ4_1 blk;
        std::memcpy(&blk, p + b * 20, 20);
        const float d = half_to_float(blk.d), m = half_to_float(blk.m);
        for (int j = 0; j < 16; ++j) {
          out[j] = fp32_mul_add(d, static_cast<float>(blk.qs[j] & 0x0F), m);
          out[j + 16] = fp32_mul_add(d, static_cast<float>(blk.qs[j] >> 4), m);
        }
      }
      return;
    case GgmlType::Q8_0:
      for (std::int64_t b = 0; b < blocks; ++b, out += 32) {
        BlockQ8_0 blk;
        std::memcpy(&blk, p + b * 34, 34);
        const float d = half_to_float(blk.d);
        for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(blk.qs[j]) * d;
      }
      return;
    case GgmlType::Q4_K:
      for (std::int64_t b = 0; b < blocks; ++b, out += 256) {
        BlockQ4_K blk;
        std::memcpy(&blk, p + b * 144, 144);
        const float d = half_to_float(blk.d), dmin = half_to_float(blk.dmin);
        // Eight sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed into 12
        // bytes: bytes 0-3 hold scales 0-3 (low 6 bits) and the top bits of scales 4-7, bytes
        // 4-7 the same for the mins, bytes 8-11 the low 4 bits of scales and mins 4-7.
        const std::uint8_t* s = blk.scales;
        float dl[8], ml[8];
        for (int k = 0; k < 4; ++k) {
          dl[k] = d * static_cast<float>(s[k] & 0x3F);
          ml[k] = dmin * static_cast<float>(s[k + 4] & 0x3F);
          dl[k + 4] = d * static_cast<float>((s[k + 8] & 0x0F) | ((s[k] >> 2) & 0x30));
          ml[k + 4] = dmin * static_cast<float>((s[k + 8] >> 4) | ((s[k + 4] >> 2) & 0x30));
        }
        for (int c = 0; c < 4; ++c) {  // 32 bytes each: low nibbles sub-block 2c, high 2c+1
          for (int j = 0; j < 32; ++j) {
            const std::uint8_t q = blk.qs[c * 32 + j];
            out[c * 64 + j] = fp32_mul_sub(dl[2 * c], static_cast<float>(q & 0x0F), ml[2 * c]);
            out[c * 64 + 32 + j] =
                fp32_mul_sub(dl[2 * c + 1], static_cast<float>(q >> 4), ml[2 * c + 1]);
          }
        }
      }
      return;
    default:
      break;
  }
  fail("dequantize_row: ggml type ", traits->name, " is not supported");
}

// ---- metadata values ---------------------------------------------------------------------------

enum class GgufType : std::uint32_t {
  UINT8 = 0, INT8 = 1, UINT16 = 2, INT16 = 3, UINT32 = 4, INT32 = 5, FLOAT32 = 6, BOOL = 7,
  STRING = 8, ARRAY = 9, UINT64 = 10, INT64 = 11, FLOAT64 = 12
};

constexpr std::string_view gguf_type_name(GgufType t) {
  switch (t) {
    case GgufType::UINT8: return "UINT8";
    case GgufType::INT8: return "INT8";
    case GgufType::UINT16: return "UINT16";
    case GgufType::INT16: return "INT16";
    case GgufType::UINT32: return "UINT32";
    case GgufType::INT32: return "INT32";
    case GgufType::FLOAT32: return "FLOAT32";
    case GgufType::BOOL: return "BOOL";
    case GgufType::STRING: return "STRING";
    case GgufType::ARRAY: return "ARRAY";
    case GgufType::UINT64: return "UINT64";
    case GgufType::INT64: return "INT64";
    case GgufType::FLOAT64: return "FLOAT64";
  }
  return "?";
}

// Bytes one value of a fixed-size type takes; 0 for STRING and ARRAY.
constexpr std::size_t gguf_scalar_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8: case GgufType::INT8: case GgufType::BOOL: return 1;
    case GgufType::UINT16: case GgufType::INT16: return 2;
    case GgufType::UINT32: case GgufType::INT32: case GgufType::FLOAT32: return 4;
    case GgufType::UINT64: case GgufType::INT64: case GgufType::FLOAT64: return 8;
    default: return 0;
  }
}

constexpr bool gguf_is_integer(GgufType t) {
  return t == GgufType::UINT8 || t == GgufType::INT8 || t == GgufType::UINT16 ||
         t == GgufType::INT16 || t == GgufType::UINT32 || t == GgufType::INT32 ||
         t == GgufType::UINT64 || t == GgufType::INT64;
}

// One metadata value. Scalars: integers in `i` (signed types) or `u` (unsigned), floats in
// `f`, bools in `b`, strings in `s`. Arrays: `elem` is the element type and the elements are in
// `ints` / `uints` / `floats` / `strings` (bools in `uints`, as 0 or 1).
struct GgufValue {
  GgufType type = GgufType::UINT8;
  GgufType elem = GgufType::UINT8;  // arrays only
  std::int64_t i = 0;
  std::uint64_t u = 0;
  double f = 0.0;
  bool b = false;
  std::string s;
  std::vector<std::int64_t> ints;
  std::vector<std::uint64_t> uints;
  std::vector<double> floats;
  std::vector<std::string> strings;

  std::uint64_t array_size() const {
    return ints.size() + uints.size() + floats.size() + strings.size();
  }
};

// One tensor of the index. `extents` are as stored (fastest-varying first, ggml's ne[]);
// `shape()` is tessera's row-major order (the reverse).
struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<std::int64_t> extents;
  std::uint64_t offset = 0;  // into the data section
  std::uint64_t nbytes = 0;
  std::int64_t numel = 0;

  Shape shape() const {
    std::vector<std::int64_t> s(extents.rbegin(), extents.rend());
    return Shape(s);
  }
};

inline constexpr std::uint32_t kGgufDefaultAlignment = 32;
inline constexpr std::uint32_t kGgufMaxDims = 4;  // GGML_MAX_DIMS

// ---- the reader -----------------------------------------------------------------------------------

class GgufFile {
 public:
  // Reads and validates the whole file.
  static GgufFile open(const std::filesystem::path& path) {
    std::error_code ec;
    const std::uintmax_t size = std::filesystem::file_size(path, ec);
    TESSERA_CHECK(!ec, "gguf '", path.string(), "': cannot open: ", ec.message());
    std::ifstream in(path, std::ios::binary);
    TESSERA_CHECK(in.is_open(), "gguf '", path.string(), "': cannot open for reading");
    GgufFile f;
    f.source_ = path.string();
    f.bytes_.resize(static_cast<std::size_t>(size));
    in.read(reinterpret_cast<char*>(f.bytes_.data()), static_cast<std::streamsize>(size));
    TESSERA_CHECK(static_cast<std::uintmax_t>(in.gcount()) == size, "gguf '", f.source_,
                  "': short read (", in.gcount(), " of ", size, " bytes)");
    f.parse();
    return f;
  }

  // Parses bytes already in memory (a fuzzer input, a download); the bytes are copied.
  static GgufFile from_memory(std::span<const std::byte> bytes, std::string source = "<memory>") {
    GgufFile f;
    f.source_ = std::move(source);
    f.bytes_.assign(bytes.begin(), bytes.end());
    f.parse();
    return f;
  }

  const std::string& source() const { return source_; }
  std::uint32_t version() const { return version_; }
  std::uint32_t alignment() const { return alignment_; }
  std::uint64_t data_offset() const { return data_offset_; }

  // ---- metadata ----
  const std::map<std::string, GgufValue, std::less<>>& metadata() const { return kv_; }
  const GgufValue* find(std::string_view key) const {
    const auto it = kv_.find(key);
    return it == kv_.end() ? nullptr : &it->second;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }

  // An integer value of any integer type, which must be >= 0.
  std::uint64_t get_u64(std::string_view key) const {
    const GgufValue& v = at(key);
    TESSERA_CHECK(gguf_is_integer(v.type), where(), "key '", key, "' is ", gguf_type_name(v.type),
                  ", expected an integer");
    if (v.type == GgufType::INT8 || v.type == GgufType::INT16 || v.type == GgufType::INT32 ||
        v.type == GgufType::INT64) {
      TESSERA_CHECK(v.i >= 0, where(), "key '", key, "' is ", v.i, ", expected >= 0");
      return static_cast<std::uint64_t>(v.i);
    }
    return v.u;
  }
  std::uint64_t get_u64(std::string_view key, std::uint64_t fallback) const {
    return contains(key) ? get_u64(key) : fallback;
  }
  double get_f64(std::string_view key) const {
    const GgufValue& v = at(key);
    TESSERA_CHECK(v.type == GgufType::FLOAT32 || v.type == GgufType::FLOAT64, where(), "key '",
                  key, "' is ", gguf_type_name(v.type), ", expected FLOAT32 or FLOAT64");
    return v.f;
  }
  double get_f64(std::string_view key, double fallback) const {
    return contains(key) ? get_f64(key) : fallback;
  }
  bool get_bool(std::string_view key, bool fallback) const {
    if (!contains(key)) return fallback;
    const GgufValue& v = at(key);
    TESSERA_CHECK(v.type == GgufType::BOOL, where(), "key '", key, "' is ",
                  gguf_type_name(v.type), ", expected BOOL");
    return v.b;
  }
  const std::string& get_string(std::string_view key) const {
    const GgufValue& v = at(key);
    TESSERA_CHECK(v.type == GgufType::STRING, where(), "key '", key, "' is ",
                  gguf_type_name(v.type), ", expected STRING");
    return v.s;
  }
  const std::vector<std::string>& strings(std::string_view key) const {
    const GgufValue& v = at(key);
    TESSERA_CHECK(v.type == GgufType::ARRAY && v.elem == GgufType::STRING, where(), "key '", key,
                  "' is not an array of strings");
    return v.strings;
  }
  // An array of signed integers (INT8/16/32/64).
  const std::vector<std::int64_t>& signed_ints(std::string_view key) const {
    const GgufValue& v = at(key);
    TESSERA_CHECK(v.type == GgufType::ARRAY &&
                      (v.elem == GgufType::INT8 || v.elem == GgufType::INT16 ||
                       v.elem == GgufType::INT32 || v.elem == GgufType::INT64),
                  where(), "key '", key, "' is not an array of signed integers");
    return v.ints;
  }

  // ---- tensors ----
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const {
    const auto it = tensor_index_.find(name);
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
  }
  const GgufTensorInfo& tensor(std::string_view name) const {
    const GgufTensorInfo* t = find_tensor(name);
    TESSERA_CHECK(t != nullptr, where(), "no tensor named '", name, "'");
    return *t;
  }
  std::span<const std::byte> raw(std::string_view name) const {
    const GgufTensorInfo& t = tensor(name);
    return {bytes_.data() + data_offset_ + t.offset, static_cast<std::size_t>(t.nbytes)};
  }
  // The tensor as fp32, in row-major shape (the stored extents reversed).
  Tensor<float> dequantize(std::string_view name) const {
    const GgufTensorInfo& t = tensor(name);
    Tensor<float> out(t.shape());
    try {
      dequantize_row(t.type, raw(name), t.numel, out.data());
    } catch (const Error& e) {
      fail(where(), "tensor '", name, "': ", e.what());
    }
    return out;
  }

 private:
  GgufFile() = default;

  std::string where() const { return "gguf '" + source_ + "': "; }

  const GgufValue& at(std::string_view key) const {
    const GgufValue* v = find(key);
    TESSERA_CHECK(v != nullptr, where(), "key '", key, "' is missing");
    return *v;
  }

  // A bounds-checked cursor over the file's bytes.
  struct Cursor {
    const std::byte* data;
    std::uint64_t size;
    std::uint64_t pos = 0;
    const GgufFile* file;

    std::uint64_t remaining() const { return size - pos; }
    void need(std::uint64_t n, std::string_view what) const {
      TESSERA_CHECK(n <= remaining(), file->where(), what, " needs ", n, " bytes at offset ", pos,
                    " but only ", remaining(), " remain in the file");
    }
    template <class S>
    S read(std::string_view what) {
      need(sizeof(S), what);
      S v;
      std::memcpy(&v, data + pos, sizeof(S));
      pos += sizeof(S);
      return v;
    }
    std::string string(std::string_view what) {
      const auto n = read<std::uint64_t>(what);
      // The length is checked against the bytes left before anything is allocated.
      TESSERA_CHECK(n <= remaining(), file->where(), what, ": string length ", n,
                    " exceeds the ", remaining(), " bytes left in the file");
      std::string s(reinterpret_cast<const char*>(data + pos), static_cast<std::size_t>(n));
      pos += n;
      return s;
    }
  };

  static std::optional<GgufType> value_type(std::uint32_t t) {
    if (t > static_cast<std::uint32_t>(GgufType::FLOAT64)) return std::nullopt;
    return static_cast<GgufType>(t);
  }

  void read_scalar(Cursor& c, GgufType t, GgufValue& v, const std::string& what) {
    switch (t) {
      case GgufType::UINT8: v.u = c.read<std::uint8_t>(what); break;
      case GgufType::INT8: v.i = c.read<std::int8_t>(what); break;
      case GgufType::UINT16: v.u = c.read<std::uint16_t>(what); break;
      case GgufType::INT16: v.i = c.read<std::int16_t>(what); break;
      case GgufType::UINT32: v.u = c.read<std::uint32_t>(what); break;
      case GgufType::INT32: v.i = c.read<std::int32_t>(what); break;
      case GgufType::UINT64: v.u = c.read<std::uint64_t>(what); break;
      case GgufType::INT64: v.i = c.read<std::int64_t>(what); break;
      case GgufType::FLOAT32: v.f = c.read<float>(what); break;
      case GgufType::FLOAT64: v.f = c.read<double>(what); break;
      case GgufType::BOOL: {
        const auto b = c.read<std::uint8_t>(what);
        TESSERA_CHECK(b <= 1, where(), what, ": BOOL byte ", static_cast<int>(b),
                      " is neither 0 nor 1");
        v.b = b != 0;
        v.u = b;
        break;
      }
      case GgufType::STRING: v.s = c.string(what); break;
      case GgufType::ARRAY: fail(where(), what, ": nested arrays are not supported");
    }
  }

  GgufValue read_value(Cursor& c, GgufType t, const std::string& what) {
    GgufValue v;
    v.type = t;
    if (t != GgufType::ARRAY) {
      read_scalar(c, t, v, what);
      return v;
    }
    // The element type is validated before any element is read or any storage is sized.
    const auto raw_elem = c.read<std::uint32_t>(what + " (array element type)");
    const auto elem = value_type(raw_elem);
    TESSERA_CHECK(elem.has_value(), where(), what, ": array element type ", raw_elem,
                  " is not a GGUF value type (0..12)");
    TESSERA_CHECK(*elem != GgufType::ARRAY, where(), what,
                  ": arrays of arrays are not supported");
    v.elem = *elem;
    const auto n = c.read<std::uint64_t>(what + " (array length)");
    // Each element takes at least its encoded size (8 bytes for a string's length), so a count
    // the remaining bytes cannot hold is refused before anything is reserved.
    const std::uint64_t min_size = *elem == GgufType::STRING ? 8 : gguf_scalar_size(*elem);
    TESSERA_CHECK(n <= c.remaining() / min_size, where(), what, ": array of ", n, " ",
                  gguf_type_name(*elem), " values cannot fit in the ", c.remaining(),
                  " bytes left in the file");
    const auto count = static_cast<std::size_t>(n);
    GgufValue e;
    switch (*elem) {
      case GgufType::STRING:
        v.strings.reserve(count);
        for (std::size_t k = 0; k < count; ++k) v.strings.push_back(c.string(what));
        break;
      case GgufType::FLOAT32: case GgufType::FLOAT64:
        v.floats.reserve(count);
        for (std::size_t k = 0; k < count; ++k) {
          read_scalar(c, *elem, e, what);
          v.floats.push_back(e.f);
        }
        break;
      case GgufType::INT8: case GgufType::INT16: case GgufType::INT32: case GgufType::INT64:
        v.ints.reserve(count);
        for (std::size_t k = 0; k < count; ++k) {
          read_scalar(c, *elem, e, what);
          v.ints.push_back(e.i);
        }
        break;
      default:  // unsigned integers and bools
        v.uints.reserve(count);
        for (std::size_t k = 0; k < count; ++k) {
          read_scalar(c, *elem, e, what);
          v.uints.push_back(e.u);
        }
        break;
    }
    return v;
  }

  void parse() {
    Cursor c{bytes_.data(), bytes_.size(), 0, this};
    const auto magic = c.read<std::uint32_t>("the magic number");
    TESSERA_CHECK(magic == 0x46554747u, where(), "not a GGUF file (the magic is not \"GGUF\")");
    version_ = c.read<std::uint32_t>("the version");
    TESSERA_CHECK(version_ != 0x03000000u && version_ != 0x02000000u, where(),
                  "big-endian GGUF files are not supported");
    TESSERA_CHECK(version_ == 2 || version_ == 3, where(), "version ", version_,
                  " is not supported (2 and 3 are)");
    const auto n_tensors = c.read<std::uint64_t>("the tensor count");
    const auto n_kv = c.read<std::uint64_t>("the key/value count");
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes, a tensor info at least
    // 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset): counts the file cannot hold are
    // refused before any table is sized.
    TESSERA_CHECK(n_kv <= c.remaining() / 13, where(), "key/value count ", n_kv,
                  " cannot fit in a file of ", bytes_.size(), " bytes");
    for (std::uint64_t k = 0; k < n_kv; ++k) {
      std::string key = c.string("key " + std::to_string(k));
      const std::string what = "key '" + key + "'";
      const auto raw_type = c.read<std::uint32_t>(what + " (value type)");
      const auto type = value_type(raw_type);
      TESSERA_CHECK(type.has_value(), where(), what, ": value type ", raw_type,
                    " is not a GGUF value type (0..12)");
      GgufValue v = read_value(c, *type, what);
      TESSERA_CHECK(!kv_.contains(key), where(), "key '", key, "' appears twice");
      kv_.emplace(std::move(key), std::move(v));
    }

    alignment_ = kGgufDefaultAlignment;
    if (const GgufValue* a = find("general.alignment")) {
      TESSERA_CHECK(a->type == GgufType::UINT32, where(), "general.alignment is ",
                    gguf_type_name(a->type), ", expected UINT32");
      TESSERA_CHECK(a->u != 0 && std::has_single_bit(a->u), where(), "general.alignment ", a->u,
                    " is not a power of two");
      alignment_ = static_cast<std::uint32_t>(a->u);
    }

    TESSERA_CHECK(n_tensors <= c.remaining() / 24, where(), "tensor count ", n_tensors,
                  " cannot fit in a file of ", bytes_.size(), " bytes");
    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t k = 0; k < n_tensors; ++k) {
      GgufTensorInfo t;
      t.name = c.string("tensor " + std::to_string(k) + " name");
      const std::string what = "tensor '" + t.name + "'";
      const auto n_dims = c.read<std::uint32_t>(what + " (n_dims)");
      TESSERA_CHECK(n_dims >= 1 && n_dims <= kGgufMaxDims, where(), what, ": n_dims ", n_dims,
                    " is outside [1, ", kGgufMaxDims, "]");
      // Both the element count and the product of the non-zero extents must fit in 63 bits:
      // with one extent 0 the tensor is empty, but the strides of its shape are products of the
      // other extents and would overflow (found by the fuzzer: UBSan in Shape's strides).
      constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
      std::uint64_t numel = 1, nonzero = 1;
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto e = c.read<std::uint64_t>(what + " (extent)");
        TESSERA_CHECK(e <= kMax, where(), what, ": extent ", e, " is too large");
        TESSERA_CHECK(!__builtin_mul_overflow(numel, e, &numel) && numel <= kMax &&
                          !__builtin_mul_overflow(nonzero, std::max<std::uint64_t>(e, 1), &nonzero) &&
                          nonzero <= kMax,
                      where(), what, ": the element count overflows 63 bits");
        t.extents.push_back(static_cast<std::int64_t>(e));
      }
      const auto raw_type = c.read<std::uint32_t>(what + " (type)");
      const auto traits = ggml_type_traits(raw_type);
      TESSERA_CHECK(traits.has_value(), where(), what, ": ggml type ", raw_type,
                    " is unknown");
      t.type = static_cast<GgmlType>(raw_type);
      TESSERA_CHECK(t.extents[0] % traits->block == 0, where(), what, ": first extent ",
                    t.extents[0], " is not a multiple of the ", traits->name, " block size ",
                    traits->block);
      TESSERA_CHECK(!__builtin_mul_overflow(numel / static_cast<std::uint64_t>(traits->block),
                                            static_cast<std::uint64_t>(traits->block_bytes),
                                            &t.nbytes),
                    where(), what, ": the byte size overflows 64 bits");
      t.numel = static_cast<std::int64_t>(numel);
      t.offset = c.read<std::uint64_t>(what + " (offset)");
      TESSERA_CHECK(t.offset % alignment_ == 0, where(), what, ": offset ", t.offset,
                    " is not a multiple of the alignment ", alignment_);
      TESSERA_CHECK(!tensor_index_.contains(t.name), where(), "tensor name '", t.name,
                    "' appears twice");
      tensor_index_.emplace(t.name, tensors_.size());
      tensors_.push_back(std::move(t));
    }

    // The data section starts at the next multiple of the alignment.
    std::uint64_t start = 0;
    TESSERA_CHECK(!__builtin_add_overflow(c.pos, alignment_ - 1, &start), where(),
                  "the data offset overflows");
    start = start / alignment_ * alignment_;
    if (tensors_.empty()) {
      data_offset_ = std::min<std::uint64_t>(start, bytes_.size());
      return;
    }
    TESSERA_CHECK(start <= bytes_.size(), where(), "the data section would start at ", start,
                  ", past the end of the file (", bytes_.size(), " bytes)");
    data_offset_ = start;
    const std::uint64_t data_size = bytes_.size() - start;
    std::vector<const GgufTensorInfo*> by_offset;
    by_offset.reserve(tensors_.size());
    for (const GgufTensorInfo& t : tensors_) {
      std::uint64_t end = 0;
      TESSERA_CHECK(!__builtin_add_overflow(t.offset, t.nbytes, &end) && end <= data_size,
                    where(), "tensor '", t.name, "': bytes [", t.offset, ", +", t.nbytes,
                    ") lie outside the data section of ", data_size, " bytes");
      if (t.nbytes > 0) by_offset.push_back(&t);
    }
    std::sort(by_offset.begin(), by_offset.end(),
              [](const auto* a, const auto* b) { return a->offset < b->offset; });
    for (std::size_t k = 1; k < by_offset.size(); ++k) {
      const GgufTensorInfo& a = *by_offset[k - 1];
      const GgufTensorInfo& b = *by_offset[k];
      TESSERA_CHECK(a.offset + a.nbytes <= b.offset, where(), "tensor '", b.name,
                    "' (offset ", b.offset, ") overlaps tensor '", a.name, "' (bytes [", a.offset,
                    ", ", a.offset + a.nbytes, "))");
    }
  }

  std::string source_;
  std::vector<std::byte> bytes_;
  std::uint32_t version_ = 0;
  std::uint32_t alignment_ = kGgufDefaultAlignment;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue, std::less<>> kv_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, std::size_t, std::less<>> tensor_index_;
};

}  // namespace tessera::io
