// tests/io/gguf_builder.hpp — writes GGUF bytes field by field, so a test (or the fuzz corpus
// generator) can produce exactly the malformed file it describes: a wrong count, an unknown
// type, an offset that overflows. Nothing here validates; that is the reader's job.
#pragma once

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::test::gguf {

class Builder {
 public:
  // Header: magic, version, tensor count, key/value count (as given, not as added).
  Builder(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3) {
    u32(0x46554747u);  // "GGUF"
    u32(version);
    u64(n_tensors);
    u64(n_kv);
  }

  Builder& u8(std::uint8_t v) { return pod(v); }
  Builder& u32(std::uint32_t v) { return pod(v); }
  Builder& i32(std::int32_t v) { return pod(v); }
  Builder& u64(std::uint64_t v) { return pod(v); }
  Builder& f32(float v) { return pod(v); }
  Builder& raw(std::string_view s) {
    bytes_.insert(bytes_.end(), s.begin(), s.end());
    return *this;
  }
  Builder& str(std::string_view s) {
    u64(s.size());
    return raw(s);
  }
  // Key/values of the common types.
  Builder& kv_u32(std::string_view key, std::uint32_t v) { return str(key).u32(4).u32(v); }
  Builder& kv_f32(std::string_view key, float v) { return str(key).u32(6).f32(v); }
  Builder& kv_str(std::string_view key, std::string_view v) { return str(key).u32(8).str(v); }
  Builder& kv_strings(std::string_view key, const std::vector<std::string>& v) {
    str(key).u32(9).u32(8).u64(v.size());
    for (const auto& s : v) str(s);
    return *this;
  }
  Builder& kv_i32s(std::string_view key, const std::vector<std::int32_t>& v) {
    str(key).u32(9).u32(5).u64(v.size());
    for (auto x : v) i32(x);
    return *this;
  }
  // A tensor info: name, extents (fastest first), ggml type, offset.
  Builder& tensor(std::string_view name, const std::vector<std::uint64_t>& extents,
                  std::uint32_t type, std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(extents.size()));
    for (auto e : extents) u64(e);
    return u32(type).u64(offset);
  }
  Builder& pad_to(std::size_t alignment) {
    while (bytes_.size() % alignment) bytes_.push_back(0);
    return *this;
  }
  Builder& zeros(std::size_t n) {
    bytes_.insert(bytes_.end(), n, 0);
    return *this;
  }

  const std::vector<std::uint8_t>& bytes() const { return bytes_; }
  std::span<const std::byte> span() const { return std::as_bytes(std::span(bytes_)); }

 private:
  template <class T>
  Builder& pod(T v) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, &v, sizeof(T));
    bytes_.insert(bytes_.end(), b, b + sizeof(T));
    return *this;
  }
  std::vector<std::uint8_t> bytes_;
};

}  // namespace tessera::test::gguf
