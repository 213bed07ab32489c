// tests/io/fuzz/fuzz_gguf_one.hpp — what one GGUF fuzz input must survive, shared by the
// libFuzzer target (clang, ASan/UBSan) and the corpus replay in test_gguf (g++).
//
// The contract for untrusted bytes: parsing, dequantising every tensor, reading the Llama
// hyperparameters and the embedded tokenizer either succeed or throw tessera::Error. Any other
// exception, crash, sanitizer report or out-of-memory is a bug. An accepted tensor must
// dequantise to exactly numel values.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

#include "tessera/io/gguf.hpp"
#include "tessera/io/gguf_llama.hpp"

namespace tessera::io::fuzz {

// Returns true when the input parsed as a GGUF file; aborts on a broken property.
inline bool fuzz_gguf_one(const std::uint8_t* data, std::size_t size) {
  std::optional<GgufFile> file;
  try {
    file.emplace(GgufFile::from_memory(std::as_bytes(std::span(data, size)), "fuzz-input"));
  } catch (const tessera::Error&) {
    return false;
  }
  for (const GgufTensorInfo& t : file->tensors()) {
    if (file->raw(t.name).size() != t.nbytes) std::abort();
    try {
      const Tensor<float> x = file->dequantize(t.name);
      if (x.numel() != t.numel) {
        std::fprintf(stderr, "tensor '%s' dequantised to %lld values, expected %lld\n",
                     t.name.c_str(), static_cast<long long>(x.numel()),
                     static_cast<long long>(t.numel));
        std::abort();
      }
    } catch (const tessera::Error&) {
    }
  }
  try {
    (void)read_llama_hparams(*file);
  } catch (const tessera::Error&) {
  }
  try {
    const GgufTokenizer tok = read_gguf_tokenizer(*file);
    const auto ids = tok.tokenizer.encode("Hello 123 <|im_start|> w\xc3\xb6rld");
    (void)tok.tokenizer.decode(ids);
  } catch (const tessera::Error&) {
  }
  return true;
}

}  // namespace tessera::io::fuzz
