// tests/io/fuzz/fuzz_gguf.cpp — libFuzzer entry point for the GGUF reader, the Llama
// hyperparameter checks and the embedded-tokenizer mapping.
//
// Built only with clang (-fsanitize=fuzzer,address,undefined; see tests/io/CMakeLists.txt) and
// run for a bounded time by CTest (label `fuzz`). The seeds are in gguf_corpus/, which
// test_gguf also replays with the ordinary g++ build.
#include "fuzz_gguf_one.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  tessera::io::fuzz::fuzz_gguf_one(data, size);
  return 0;
}
