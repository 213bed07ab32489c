// tessera/io/safetensors.hpp — read and write weights in the safetensors format.
//
// Why safetensors: it is the interchange format of the Hugging Face ecosystem and, unlike a
// pickle, it cannot run code: a file is an 8-byte little-endian header length N, N bytes of
// JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then
// one byte buffer that the offsets index.
//
// Why so many checks: weights are downloaded from anywhere, so every file is untrusted input.
// The reader never believes a number it has not checked against the file: the header size is
// capped (kMaxHeaderBytes, and never more than the file), JSON errors and duplicate keys are
// reported as tessera::Error naming the file, every shape/offset product is computed with
// overflow checks, every byte range must lie inside the data buffer, tensors may not overlap,
// and the buffer must be covered exactly (no holes, no trailing bytes), as the format requires
// and as the reference Rust reader enforces, so a file cannot smuggle a second payload
// ("polyglot" files). The largest allocation is bounded by the file's own size. A libFuzzer
// target (tests/io/fuzz) exercises all of this under ASan/UBSan.
//
// What it offers:
//   SafetensorsFile        open(path) / from_memory(bytes); names(), info(name), metadata(),
//                          read<T>(name) (stored dtype must be T) and read_as<T>(name)
//                          (converts between float formats, or between integer formats
//                          when every value fits).
//   load_tensor<T>, load_tensor_as<T>     one-call versions of the above.
//   save_safetensors(path, entries, metadata)   atomic write (temp file, fsync, rename).
//   serialize_safetensors(entries, metadata)    the same bytes, in memory.
//   save_parameters / load_parameters           a whole named parameter set through a
//                          visitor; a missing, extra or mis-shaped tensor is refused by name.
// docs/safetensors.md describes the API and every check.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tessera/core/error.hpp"
#include "tessera/core/number.hpp"
#include "tessera/core/shape.hpp"
#include "tessera/core/tensor.hpp"

namespace tessera::io {

// The format stores little-endian values and tessera copies them verbatim.
static_assert(std::endian::native == std::endian::little,
              "tessera's safetensors reader copies little-endian bytes verbatim");

// ---- dtypes ---------------------------------------------------------------------------------

// The safetensors dtypes tessera reads and writes. (The format also names U16/U32/U64, F8_E8M0,
// complex and 4-bit types; a file using them is refused with the dtype's name.)
enum class Dtype { F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U8, BOOL };

inline constexpr Dtype kAllDtypes[] = {Dtype::F64,     Dtype::F32,     Dtype::F16, Dtype::BF16,
                                       Dtype::F8_E4M3, Dtype::F8_E5M2, Dtype::I64, Dtype::I32,
                                       Dtype::I16,     Dtype::I8,      Dtype::U8,  Dtype::BOOL};

// The dtype string exactly as it appears in a safetensors header.
constexpr std::string_view dtype_name(Dtype d) {
  switch (d) {
    case Dtype::F64: return "F64";
    case Dtype::F32: return "F32";
    case Dtype::F16: return "F16";
    case Dtype::BF16: return "BF16";
    case Dtype::F8_E4M3: return "F8_E4M3";
    case Dtype::F8_E5M2: return "F8_E5M2";
    case Dtype::I64: return "I64";
    case Dtype::I32: return "I32";
    case Dtype::I16: return "I16";
    case Dtype::I8: return "I8";
    case Dtype::U8: return "U8";
    case Dtype::BOOL: return "BOOL";
  }
  return "?";
}

constexpr std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F64: case Dtype::I64: return 8;
    case Dtype::F32: case Dtype::I32: return 4;
    case Dtype::F16: case Dtype::BF16: case Dtype::I16: return 2;
    default: return 1;
  }
}

constexpr bool is_floating(Dtype d) {
  return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16 ||
         d == Dtype::F8_E4M3 || d == Dtype::F8_E5M2;
}
constexpr bool is_integer(Dtype d) { return !is_floating(d) && d != Dtype::BOOL; }

inline std::ostream& operator<<(std::ostream& out, Dtype d) { return out << dtype_name(d); }

inline std::optional<Dtype> parse_dtype(std::string_view s) {
  for (Dtype d : kAllDtypes)
    if (dtype_name(d) == s) return d;
  return std::nullopt;
}

// dtype_of<T>: the safetensors dtype of a C++ element type (only the types listed have one).
template <class T>
struct DtypeOf;
template <> struct DtypeOf<double> { static constexpr Dtype value = Dtype::F64; };
template <> struct DtypeOf<float> { static constexpr Dtype value = Dtype::F32; };
template <> struct DtypeOf<fp16> { static constexpr Dtype value = Dtype::F16; };
template <> struct DtypeOf<bf16> { static constexpr Dtype value = Dtype::BF16; };
template <> struct DtypeOf<fp8_e4m3> { static constexpr Dtype value = Dtype::F8_E4M3; };
template <> struct DtypeOf<fp8_e5m2> { static constexpr Dtype value = Dtype::F8_E5M2; };
template <> struct DtypeOf<std::int64_t> { static constexpr Dtype value = Dtype::I64; };
template <> struct DtypeOf<std::int32_t> { static constexpr Dtype value = Dtype::I32; };
template <> struct DtypeOf<std::int16_t> { static constexpr Dtype value = Dtype::I16; };
template <> struct DtypeOf<std::int8_t> { static constexpr Dtype value = Dtype::I8; };
template <> struct DtypeOf<std::uint8_t> { static constexpr Dtype value = Dtype::U8; };
template <> struct DtypeOf<bool> { static constexpr Dtype value = Dtype::BOOL; };

template <class T>
concept SafetensorsElement = requires { DtypeOf<T>::value; } && sizeof(T) == dtype_size(DtypeOf<T>::value);

template <SafetensorsElement T>
inline constexpr Dtype dtype_of = DtypeOf<T>::value;

// ---- header model ---------------------------------------------------------------------------

// One tensor's header entry. `begin`/`end` are byte offsets into the data buffer (after the
// header), as in the file. The shape is kept as read (any rank); read<T> needs rank <= 6.
struct TensorInfo {
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;  // cannot overflow: checked against the file when parsed
    return n;
  }
  std::uint64_t nbytes() const { return end - begin; }
};

// A header bigger than this is refused before any allocation (real headers are a few MB: a
// 100k-tensor checkpoint needs about 10 MB). The reference reader uses the same cap.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

namespace detail {

// a * b, or nullopt when the product does not fit in 64 bits.
inline std::optional<std::uint64_t> checked_mul(std::uint64_t a, std::uint64_t b) {
  std::uint64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}

inline std::string shape_str(const std::vector<std::int64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

struct ParsedHeader {
  std::map<std::string, TensorInfo, std::less<>> tensors;
  std::map<std::string, std::string, std::less<>> metadata;
};

// Parses and validates a header against a data buffer of `data_size` bytes. `source` names the
// file in every message. Throws tessera::Error on anything the format does not allow.
inline ParsedHeader parse_header(std::string_view header, std::uint64_t data_size,
                                 const std::string& source) {
  using nlohmann::json;
  const std::string where = "safetensors '" + source + "': ";

  // A valid header nests three levels (top object, entry, shape array). Deeper input is
  // refused by a linear pre-scan, before nlohmann builds parser stacks proportional to it.
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : header) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      TESSERA_CHECK(++depth <= 3, where, "the JSON header nests deeper than the format allows");
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }

  // nlohmann keeps the last of two equal keys; a file whose tensor table depends on which
  // duplicate wins is ambiguous (two readers may disagree), so duplicates are refused. The
  // parser callback sees every key; one set of keys per open object.
  std::vector<std::set<std::string>> open_objects;
  std::string problem;
  auto callback = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      open_objects.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == json::parse_event_t::key && !open_objects.empty() &&
               !open_objects.back().insert(parsed.get<std::string>()).second && problem.empty()) {
      problem = "duplicate key '" + parsed.get<std::string>() + "' in the JSON header";
    }
    return true;
  };
  json root;
  try {
    root = json::parse(header.begin(), header.end(), callback);
  } catch (const json::exception& e) {
    fail(where, "header is not valid JSON: ", e.what());
  }
  if (!problem.empty()) fail(where, problem);
  TESSERA_CHECK(root.is_object(), where, "header is JSON but not an object");

  ParsedHeader out;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      TESSERA_CHECK(v.is_object(), where, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        TESSERA_CHECK(m.value().is_string(), where, "__metadata__ value of '", m.key(),
                      "' is not a string");
        out.metadata.emplace(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    const std::string what = where + "tensor '" + name + "': ";
    TESSERA_CHECK(v.is_object(), what, "entry is not an object");
    for (auto f = v.begin(); f != v.end(); ++f)
      TESSERA_CHECK(f.key() == "dtype" || f.key() == "shape" || f.key() == "data_offsets", what,
                    "unknown field '", f.key(), "' (expected dtype, shape, data_offsets)");
    TESSERA_CHECK(v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"), what,
                  "entry needs dtype, shape and data_offsets");

    TensorInfo info;
    const json& dt = v["dtype"];
    TESSERA_CHECK(dt.is_string(), what, "dtype is not a string");
    auto parsed_dtype = parse_dtype(dt.get<std::string>());
    TESSERA_CHECK(parsed_dtype.has_value(), what, "unknown or unsupported dtype '",
                  dt.get<std::string>(), "'");
    info.dtype = *parsed_dtype;

    // Shape: non-negative integers; their product times the item size must fit in 64 bits.
    const json& sh = v["shape"];
    TESSERA_CHECK(sh.is_array(), what, "shape is not an array");
    std::uint64_t nbytes = dtype_size(info.dtype);
    std::uint64_t nonzero_product = dtype_size(info.dtype);
    for (const json& d : sh) {
      TESSERA_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<std::int64_t>() >= 0),
                    what, "shape entry ", d.dump(), " is not a non-negative integer");
      const std::uint64_t extent = d.get<std::uint64_t>();
      TESSERA_CHECK(extent <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                    what, "shape entry ", extent, " is too large");
      // Both the byte count and the product of the non-zero extents (which bounds every
      // stride tessera derives from the shape) must fit, even when another extent is 0.
      auto product = checked_mul(nbytes, extent);
      auto strides = checked_mul(nonzero_product, std::max<std::uint64_t>(extent, 1));
      TESSERA_CHECK(product.has_value() && strides.has_value() &&
                        *strides <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                    what, "shape ", sh.dump(), " overflows 64 bits when multiplied out");
      nbytes = *product;
      nonzero_product = *strides;
      info.shape.push_back(static_cast<std::int64_t>(extent));
    }

    const json& off = v["data_offsets"];
    TESSERA_CHECK(off.is_array() && off.size() == 2 && off[0].is_number_unsigned() &&
                      off[1].is_number_unsigned(),
                  what, "data_offsets ", off.dump(), " is not a pair of non-negative integers");
    info.begin = off[0].get<std::uint64_t>();
    info.end = off[1].get<std::uint64_t>();
    TESSERA_CHECK(info.begin <= info.end, what, "data_offsets [", info.begin, ", ", info.end,
                  "] end before they begin");
    TESSERA_CHECK(info.end <= data_size, what, "data_offsets [", info.begin, ", ", info.end,
                  "] lie outside the data buffer of ", data_size, " bytes");
    TESSERA_CHECK(info.end - info.begin == nbytes, what, "dtype ", dtype_name(info.dtype),
                  " and shape ", shape_str(info.shape), " need ", nbytes,
                  " bytes but data_offsets [", info.begin, ", ", info.end, "] span ",
                  info.end - info.begin);
    out.tensors.emplace(name, std::move(info));
  }

  // The buffer must be covered exactly: sorted by offset, each tensor starts where the
  // previous one ended. Empty tensors take no room and may sit anywhere in the buffer.
  std::vector<std::pair<const std::string*, const TensorInfo*>> by_offset;
  for (const auto& [name, info] : out.tensors)
    if (info.nbytes() > 0) by_offset.emplace_back(&name, &info);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  std::uint64_t cursor = 0;
  const std::string* previous = nullptr;
  for (const auto& [name, info] : by_offset) {
    TESSERA_CHECK(info->begin >= cursor, where, "tensor '", *name, "' (bytes [", info->begin, ", ",
                  info->end, ")) overlaps tensor '", previous ? *previous : "", "' (ending at ",
                  cursor, ")");
    TESSERA_CHECK(info->begin == cursor, where, "bytes [", cursor, ", ", info->begin,
                  ") of the data buffer belong to no tensor (the format forbids holes)");
    cursor = info->end;
    previous = name;
  }
  TESSERA_CHECK(cursor == data_size, where, "bytes [", cursor, ", ", data_size,
                ") at the end of the data buffer belong to no tensor");
  return out;
}

// Reads a little-endian u64 from 8 bytes.
inline std::uint64_t load_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

template <class S>
S load_as(const unsigned char* p) {
  S s;
  std::memcpy(&s, p, sizeof(S));
  return s;
}

// The checked conversion behind read_as: one stored element to T.
template <class T>
T convert_element(const unsigned char* p, Dtype from) {
  if constexpr (std::is_floating_point_v<T> || LowPrecisionNumber<T>) {
    double x = 0;
    switch (from) {
      case Dtype::F64: x = load_as<double>(p); break;
      case Dtype::F32: x = load_as<float>(p); break;
      case Dtype::F16: x = to_float(load_as<fp16>(p)); break;
      case Dtype::BF16: x = to_float(load_as<bf16>(p)); break;
      case Dtype::F8_E4M3: x = to_float(load_as<fp8_e4m3>(p)); break;
      case Dtype::F8_E5M2: x = to_float(load_as<fp8_e5m2>(p)); break;
      default: break;  // excluded by the caller
    }
    if constexpr (std::is_same_v<T, double>) return x;
    else if constexpr (std::is_same_v<T, float>) return static_cast<float>(x);
    else return from_float<T>(static_cast<float>(x));  // F64 -> low precision rounds twice
  } else {
    std::int64_t x = 0;
    switch (from) {
      case Dtype::I64: x = load_as<std::int64_t>(p); break;
      case Dtype::I32: x = load_as<std::int32_t>(p); break;
      case Dtype::I16: x = load_as<std::int16_t>(p); break;
      case Dtype::I8: x = load_as<std::int8_t>(p); break;
      case Dtype::U8: x = load_as<std::uint8_t>(p); break;
      default: break;  // excluded by the caller
    }
    if (!std::in_range<T>(x)) fail("value ", x, " does not fit in ", dtype_name(dtype_of<T>));
    return static_cast<T>(x);
  }
}

}  // namespace detail

// ---- reader ---------------------------------------------------------------------------------

// A validated safetensors file. open() reads and checks only the header; tensors are read on
// demand with a bounds-checked file read (or a copy, for from_memory).
class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::filesystem::path& path) {
    SafetensorsFile f;
    f.source_ = path.string();
    std::error_code ec;
    const std::uintmax_t file_size = std::filesystem::file_size(path, ec);
    TESSERA_CHECK(!ec, "safetensors '", f.source_, "': cannot open: ", ec.message());
    f.stream_.open(path, std::ios::binary);
    TESSERA_CHECK(f.stream_.is_open(), "safetensors '", f.source_, "': cannot open for reading");
    f.init(file_size, [&](std::uint64_t offset, std::size_t n, void* dst) {
      f.stream_.seekg(static_cast<std::streamoff>(offset));
      f.stream_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
      return static_cast<std::size_t>(f.stream_.gcount()) == n;
    });
    return f;
  }

  // Parses bytes already in memory (a download, a fuzzer input). The bytes are copied.
  static SafetensorsFile from_memory(std::span<const std::byte> bytes,
                                     std::string source = "<memory>") {
    SafetensorsFile f;
    f.source_ = std::move(source);
    f.memory_.assign(bytes.begin(), bytes.end());
    f.init(bytes.size(), [&](std::uint64_t offset, std::size_t n, void* dst) {
      return f.copy_from_memory(offset, n, dst);
    });
    return f;
  }

  const std::string& source() const { return source_; }

  // Tensor names in sorted order (not file order).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const auto& [name, info] : header_.tensors) out.push_back(name);
    return out;
  }
  bool contains(std::string_view name) const { return header_.tensors.contains(name); }
  std::size_t size() const { return header_.tensors.size(); }

  const TensorInfo& info(std::string_view name) const {
    auto it = header_.tensors.find(name);
    if (it == header_.tensors.end())
      fail("safetensors '", source_, "': no tensor named '", name, "'");
    return it->second;
  }
  const std::map<std::string, std::string, std::less<>>& metadata() const {
    return header_.metadata;
  }

  // The tensor with its stored dtype, which must be T's.
  template <SafetensorsElement T>
  Tensor<T> read(std::string_view name) {
    auto t = Tensor<T>::empty(shape_of(name));
    read_into(name, std::span<T>(t.data(), static_cast<std::size_t>(t.numel())));
    return t;
  }

  // Reads into caller-owned storage of exactly the tensor's element count.
  template <SafetensorsElement T>
  void read_into(std::string_view name, std::span<T> out) {
    const TensorInfo& ti = info(name);
    TESSERA_CHECK(ti.dtype == dtype_of<T>, "safetensors '", source_, "': tensor '", name,
                  "' is stored as ", dtype_name(ti.dtype), ", expected ", dtype_name(dtype_of<T>),
                  " (use read_as to convert)");
    TESSERA_CHECK(out.size() == static_cast<std::uint64_t>(ti.numel()), "safetensors '", source_,
                  "': tensor '", name, "' has ", ti.numel(), " elements, destination has ",
                  out.size());
    if (ti.nbytes() == 0) return;
    if constexpr (std::is_same_v<T, bool>) {
      // A bool byte other than 0 or 1 is undefined behaviour once loaded, so go via bytes.
      std::vector<std::uint8_t> raw(out.size());
      read_bytes(ti, raw.data(), name);
      for (std::size_t i = 0; i < raw.size(); ++i) {
        TESSERA_CHECK(raw[i] <= 1, "safetensors '", source_, "': BOOL tensor '", name,
                      "' holds byte ", int(raw[i]), " at element ", i);
        out[i] = raw[i] != 0;
      }
    } else {
      read_bytes(ti, out.data(), name);
    }
  }

  // The tensor converted to T: between floating formats (F64/F32/F16/BF16/F8 -> float,
  // double, bf16, fp16, fp8; rounding to nearest even) or between integer formats (each
  // value must fit). Float <-> integer and BOOL are never converted implicitly.
  template <SafetensorsElement T>
  Tensor<T> read_as(std::string_view name) {
    const TensorInfo& ti = info(name);
    if (ti.dtype == dtype_of<T>) return read<T>(name);
    constexpr Dtype want = dtype_of<T>;
    TESSERA_CHECK((is_floating(ti.dtype) && is_floating(want)) ||
                      (is_integer(ti.dtype) && is_integer(want)),
                  "safetensors '", source_, "': tensor '", name, "' is stored as ",
                  dtype_name(ti.dtype), " and cannot be converted to ", dtype_name(want));
    auto t = Tensor<T>::empty(shape_of(name));
    std::vector<unsigned char> raw(ti.nbytes());
    if (!raw.empty()) read_bytes(ti, raw.data(), name);
    const std::size_t step = dtype_size(ti.dtype);
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      try {
        t.data()[i] = detail::convert_element<T>(raw.data() + i * step, ti.dtype);
      } catch (const Error& e) {
        fail("safetensors '", source_, "': tensor '", name, "' element ", i, ": ", e.what());
      }
    }
    return t;
  }

  // The raw stored bytes of a tensor (any dtype).
  std::vector<std::byte> read_raw(std::string_view name) {
    const TensorInfo& ti = info(name);
    std::vector<std::byte> out(ti.nbytes());
    if (!out.empty()) read_bytes(ti, out.data(), name);
    return out;
  }

 private:
  SafetensorsFile() = default;

  template <class Reader>
  void init(std::uint64_t file_size, Reader&& reader) {
    const std::string where = "safetensors '" + source_ + "': ";
    TESSERA_CHECK(file_size >= 8, where, "file has ", file_size,
                  " bytes, too short for the 8-byte header length");
    unsigned char len_bytes[8];
    TESSERA_CHECK(reader(0, 8, len_bytes), where, "cannot read the header length");
    const std::uint64_t header_len = detail::load_u64_le(len_bytes);
    TESSERA_CHECK(header_len <= kMaxHeaderBytes, where, "header length ", header_len,
                  " exceeds the limit of ", kMaxHeaderBytes, " bytes");
    TESSERA_CHECK(header_len <= file_size - 8, where, "header length ", header_len,
                  " exceeds the ", file_size - 8, " bytes that follow it in the file");
    std::string header(header_len, '\0');
    TESSERA_CHECK(reader(8, header_len, header.data()), where, "cannot read the ", header_len,
                  "-byte header");
    data_start_ = 8 + header_len;
    data_size_ = file_size - data_start_;
    header_ = detail::parse_header(header, data_size_, source_);
  }

  bool copy_from_memory(std::uint64_t offset, std::size_t n, void* dst) const {
    if (offset > memory_.size() || n > memory_.size() - offset) return false;
    std::memcpy(dst, memory_.data() + offset, n);
    return true;
  }

  void read_bytes(const TensorInfo& ti, void* dst, std::string_view name) {
    // Offsets were checked against the buffer when the header was parsed; a file that shrank
    // since then makes the read come up short, which is reported, never read past.
    const std::uint64_t offset = data_start_ + ti.begin;
    const std::size_t n = static_cast<std::size_t>(ti.nbytes());
    bool ok;
    if (stream_.is_open()) {
      stream_.clear();
      stream_.seekg(static_cast<std::streamoff>(offset));
      stream_.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
      ok = static_cast<std::size_t>(stream_.gcount()) == n;
    } else {
      ok = copy_from_memory(offset, n, dst);
    }
    TESSERA_CHECK(ok, "safetensors '", source_, "': tensor '", name, "': could not read ", n,
                  " bytes at offset ", offset, " (file truncated?)");
  }

  Shape shape_of(std::string_view name) const {
    const TensorInfo& ti = info(name);
    TESSERA_CHECK(ti.shape.size() <= static_cast<std::size_t>(Shape::kMaxRank), "safetensors '",
                  source_, "': tensor '", name, "' has rank ", ti.shape.size(),
                  "; tessera tensors have rank at most ", Shape::kMaxRank);
    return Shape(std::span<const std::int64_t>(ti.shape));
  }

  std::string source_;
  std::ifstream stream_;
  std::vector<std::byte> memory_;
  std::uint64_t data_start_ = 0;
  std::uint64_t data_size_ = 0;
  detail::ParsedHeader header_;
};

template <SafetensorsElement T>
Tensor<T> load_tensor(const std::filesystem::path& file, std::string_view name) {
  return SafetensorsFile::open(file).read<T>(name);
}
template <SafetensorsElement T>
Tensor<T> load_tensor_as(const std::filesystem::path& file, std::string_view name) {
  return SafetensorsFile::open(file).read_as<T>(name);
}

// ---- writer ---------------------------------------------------------------------------------

// One tensor to write: its name, dtype, shape and raw little-endian bytes. The bytes are
// borrowed, so the tensor must outlive the save call.
struct TensorEntry {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::int64_t> shape;
  std::span<const std::byte> bytes;

  TensorEntry(std::string name_, Dtype dtype_, std::vector<std::int64_t> shape_,
              std::span<const std::byte> bytes_)
      : name(std::move(name_)), dtype(dtype_), shape(std::move(shape_)), bytes(bytes_) {}

  // From a tensor (implicit, so `{{"w", w}, {"b", b}}` reads naturally).
  template <SafetensorsElement T>
  TensorEntry(std::string name_, const Tensor<T>& t)
      : name(std::move(name_)),
        dtype(dtype_of<T>),
        shape(t.shape().begin(), t.shape().end()),
        bytes(std::as_bytes(t.span())) {}
  template <SafetensorsElement T>
  TensorEntry(std::string name_, TensorView<const T, Cpu> v)
      : name(std::move(name_)), dtype(dtype_of<T>), shape(v.shape().begin(), v.shape().end()) {
    TESSERA_CHECK(v.is_contiguous(), "save_safetensors: tensor '", name,
                  "' is a strided view; call contiguous() first");
    bytes = std::as_bytes(std::span<const T>(v.data(), static_cast<std::size_t>(v.numel())));
  }
  template <SafetensorsElement T>
  TensorEntry(std::string name_, TensorView<T, Cpu> v)
      : TensorEntry(std::move(name_), TensorView<const T, Cpu>(v)) {}
};

// The complete file contents: header (keys sorted, data aligned to 8 bytes by padding the
// header with spaces) followed by the tensors in name order.
inline std::string serialize_safetensors(const std::vector<TensorEntry>& entries,
                                         const std::map<std::string, std::string>& metadata = {}) {
  std::vector<const TensorEntry*> sorted;
  for (const auto& e : entries) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(),
            [](const TensorEntry* a, const TensorEntry* b) { return a->name < b->name; });

  nlohmann::json header = nlohmann::json::object();  // std::map inside: dumps keys sorted
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < sorted.size(); ++i) {
    const TensorEntry& e = *sorted[i];
    TESSERA_CHECK(e.name != "__metadata__",
                  "save_safetensors: '__metadata__' is reserved and cannot name a tensor");
    TESSERA_CHECK(i == 0 || sorted[i - 1]->name != e.name, "save_safetensors: tensor '", e.name,
                  "' appears twice");
    std::uint64_t nbytes = dtype_size(e.dtype);
    for (auto d : e.shape) {
      TESSERA_CHECK(d >= 0, "save_safetensors: tensor '", e.name, "' has negative extent ", d);
      auto p = detail::checked_mul(nbytes, static_cast<std::uint64_t>(d));
      TESSERA_CHECK(p.has_value(), "save_safetensors: tensor '", e.name, "' is too large");
      nbytes = *p;
    }
    TESSERA_CHECK(nbytes == e.bytes.size(), "save_safetensors: tensor '", e.name, "' (",
                  dtype_name(e.dtype), ", shape ", detail::shape_str(e.shape), ") needs ", nbytes,
                  " bytes, ", e.bytes.size(), " given");
    header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + text.size() + offset);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((text.size() >> (8 * i)) & 0xff));
  out += text;
  for (const TensorEntry* e : sorted)
    out.append(reinterpret_cast<const char*>(e->bytes.data()), e->bytes.size());
  return out;
}

namespace detail {
inline void write_all(int fd, const char* p, std::size_t n, const std::string& tmp) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    TESSERA_CHECK(w > 0, "save_safetensors: writing '", tmp, "' failed: ", std::strerror(errno));
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}
}  // namespace detail

// Writes the file atomically: a reader sees either the old file or the complete new one,
// never a torn write (a crash mid-checkpoint must not destroy the last good checkpoint). The
// bytes go to a temporary file in the same directory (rename is atomic only within one file
// system), which is fsynced, renamed over `path`, and then the directory is fsynced.
inline void save_safetensors(const std::filesystem::path& path,
                             const std::vector<TensorEntry>& entries,
                             const std::map<std::string, std::string>& metadata = {}) {
  const std::string bytes = serialize_safetensors(entries, metadata);
  static std::atomic<unsigned> counter{0};
  const std::filesystem::path dir =
      path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const std::string tmp = (dir / ("." + path.filename().string() + ".tmp." +
                                  std::to_string(::getpid()) + "." + std::to_string(counter++)))
                              .string();
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  TESSERA_CHECK(fd >= 0, "save_safetensors: cannot create '", tmp, "': ", std::strerror(errno));
  try {
    detail::write_all(fd, bytes.data(), bytes.size(), tmp);
    TESSERA_CHECK(::fsync(fd) == 0, "save_safetensors: fsync of '", tmp, "' failed: ",
                  std::strerror(errno));
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::close(fd) != 0 || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    fail("save_safetensors: cannot move '", tmp, "' to '", path.string(), "': ", why);
  }
  // Makes the rename itself durable. Best effort: some file systems refuse fsync on a dir.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

// ---- named parameter sets -------------------------------------------------------------------
//
// `visit(f)` must call f(std::string_view name, Tensor<T>& value) once per tensor (T may
// differ between calls, so f is generic). A layer's visit_parameters yields Parameters rather
// than Tensors; adapt it in one line:
//   save_parameters(path, [&](auto f) {
//     model.visit_parameters([&](std::string_view n, auto& p) { f(n, p.value); });
//   });

template <class Visit>
void save_parameters(const std::filesystem::path& path, Visit&& visit,
                     const std::map<std::string, std::string>& metadata = {}) {
  std::vector<TensorEntry> entries;
  visit([&](std::string_view name, const auto& tensor) {
    entries.emplace_back(std::string(name), tensor);
  });
  save_safetensors(path, entries, metadata);  // refuses duplicate names
}

enum class DtypeConversion { kExact, kConvert };

// Fills every visited tensor from the file. The file must hold exactly the visited names,
// each with the visited tensor's shape (and its dtype, unless kConvert). Everything is checked
// before anything is written, so a refused file leaves the parameters untouched; `visit` is
// therefore called twice.
template <class Visit>
void load_parameters(const std::filesystem::path& path, Visit&& visit,
                     DtypeConversion conversion = DtypeConversion::kExact) {
  SafetensorsFile file = SafetensorsFile::open(path);
  const std::string where = "load_parameters '" + file.source() + "': ";
  std::set<std::string, std::less<>> visited;
  visit([&](std::string_view name, auto& tensor) {
    using T = typename std::remove_cvref_t<decltype(tensor)>::value_type;
    TESSERA_CHECK(visited.emplace(name).second, where, "the model names tensor '", name,
                  "' twice");
    TESSERA_CHECK(file.contains(name), where, "tensor '", name, "' is missing from the file");
    const TensorInfo& ti = file.info(name);
    const std::vector<std::int64_t> want(tensor.shape().begin(), tensor.shape().end());
    TESSERA_CHECK(ti.shape == want, where, "tensor '", name, "' has shape ",
                  detail::shape_str(ti.shape), " in the file, the model expects ",
                  detail::shape_str(want));
    if (conversion == DtypeConversion::kExact)
      TESSERA_CHECK(ti.dtype == dtype_of<T>, where, "tensor '", name, "' is stored as ",
                    dtype_name(ti.dtype), ", the model expects ", dtype_name(dtype_of<T>));
  });
  for (const auto& name : file.names())
    TESSERA_CHECK(visited.contains(name), where, "the file holds tensor '", name,
                  "', which the model does not have");
  visit([&](std::string_view name, auto& tensor) {
    using T = typename std::remove_cvref_t<decltype(tensor)>::value_type;
    if (file.info(name).dtype == dtype_of<T>) {
      file.read_into<T>(name, tensor.span());
    } else {
      auto converted = file.read_as<T>(name);
      std::copy_n(converted.data(), converted.numel(), tensor.data());
    }
  });
}

}  // namespace tessera::io
