// tests/models/decoder_device_compile_fail.cpp — asking for a model on a device it does not run
// on yet is a compile error that says so, never a link error. Built by CTest with
// -DTESSERA_DEVICE_CASE_DECODER or -DTESSERA_DEVICE_CASE_ENCODER (tests/models/CMakeLists.txt);
// without either it builds the Cpu decoder type (the models run by the other tests here).
#include "tessera/models/decoder.hpp"
#include "tessera/models/encoder.hpp"

namespace {
struct Small {
  static constexpr int vocab = 16, d_model = 8, layers = 1, heads = 2, classes = 2;
};
}  // namespace


int main() {
  // sizeof instantiates the class (and its static_asserts) without its member functions.
#if defined(TESSERA_DEVICE_CASE_DECODER)
  return static_cast<int>(sizeof(tessera::Decoder<Small, tessera::Cuda>));
#elif defined(TESSERA_DEVICE_CASE_ENCODER)
  return static_cast<int>(sizeof(tessera::Encoder<Small, tessera::Cuda>));
#else
  return static_cast<int>(sizeof(tessera::Decoder<Small, tessera::Cpu>) == 0);
#endif
}
