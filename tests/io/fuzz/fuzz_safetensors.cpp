// tests/io/fuzz/fuzz_safetensors.cpp — libFuzzer entry point for the safetensors reader.
//
// Built only with clang (-fsanitize=fuzzer,address,undefined; see tests/io/CMakeLists.txt) and
// run for a bounded time by CTest (label `fuzz`). Inputs that crashed or surprised it are kept
// in corpus/, which test_safetensors also replays with the ordinary g++ build.
#include "fuzz_one.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  tessera::io::fuzz::fuzz_one(data, size);
  return 0;
}
