// tests/io/fuzz/fuzz_one.hpp — what one fuzz input must survive, shared by the libFuzzer target
// (built with clang under ASan/UBSan) and the corpus regression test (built with g++).
//
// The contract for untrusted bytes: parsing and reading either succeed or throw
// tessera::Error. Any other exception, crash, sanitizer report or out-of-memory is a bug. An
// accepted file must also survive a round trip: serialising what was read and parsing it
// again gives the same names, dtypes, shapes, bytes and metadata.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "tessera/io/safetensors.hpp"

namespace tessera::io::fuzz {

// Returns true when the input was accepted as a valid file; aborts on a broken property.
inline bool fuzz_one(const std::uint8_t* data, std::size_t size) {
  using namespace tessera::io;
  try {
    auto file = SafetensorsFile::from_memory(std::as_bytes(std::span(data, size)), "fuzz-input");
    std::vector<std::vector<std::byte>> raw;
    raw.reserve(file.size());  // entries borrow these buffers: no reallocation
    std::vector<TensorEntry> entries;
    for (const std::string& name : file.names()) {
      const TensorInfo& info = file.info(name);
      raw.push_back(file.read_raw(name));
      if (raw.back().size() != info.nbytes()) std::abort();
      // Typed reads may refuse (rank above 6, a BOOL byte other than 0/1), but only by Error.
      // A view derives strides from the shape, which must not overflow either.
      try {
        if (is_floating(info.dtype)) (void)file.read_as<float>(name).view();
        else if (is_integer(info.dtype)) (void)file.read_as<std::int64_t>(name).view();
        else (void)file.read<bool>(name).view();
      } catch (const tessera::Error&) {
      }
      entries.emplace_back(name, info.dtype, info.shape, raw.back());
    }
    const std::map<std::string, std::string> metadata(file.metadata().begin(),
                                                      file.metadata().end());
    const std::string again = serialize_safetensors(entries, metadata);
    auto reread = SafetensorsFile::from_memory(std::as_bytes(std::span(again)), "round-trip");
    if (reread.names() != file.names() || reread.metadata() != file.metadata()) {
      std::fprintf(stderr, "round trip changed the tensor table\n");
      std::abort();
    }
    for (std::size_t i = 0; i < entries.size(); ++i) {
      const TensorInfo& a = file.info(entries[i].name);
      const TensorInfo& b = reread.info(entries[i].name);
      if (a.dtype != b.dtype || a.shape != b.shape || reread.read_raw(entries[i].name) != raw[i]) {
        std::fprintf(stderr, "round trip changed tensor '%s'\n", entries[i].name.c_str());
        std::abort();
      }
    }
    return true;
  } catch (const tessera::Error&) {
    return false;
  }
}

}  // namespace tessera::io::fuzz
