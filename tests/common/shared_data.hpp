// tests/common/shared_data.hpp — where the real material of ../shared/data lives.
//
// The build passes TESSERA_DATA_DIR (CMake cache variable of the same name, default
// <source>/../shared/data); the environment variable TESSERA_DATA_DIR overrides it, so a test
// binary can be pointed at another copy without rebuilding. A checkout without the folder
// cannot run the tests that read it: they print "TESSERA_SKIP:" (CTest then reports them
// skipped, never passed).
#pragma once

#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <iostream>
#include <string>

#ifndef TESSERA_DATA_DIR
#define TESSERA_DATA_DIR "../shared/data"
#endif

namespace tessera::test {

inline std::filesystem::path shared_data_dir() {
  if (const char* env = std::getenv("TESSERA_DATA_DIR"); env && *env) return env;
  return TESSERA_DATA_DIR;
}

inline std::filesystem::path tokenizers_dir() { return shared_data_dir() / "tokenizers"; }

// True when every named file exists under shared_data_dir(); otherwise prints the skip line.
inline bool have_shared_files(std::initializer_list<const char*> relative_paths) {
  for (const char* rel : relative_paths) {
    const auto p = shared_data_dir() / rel;
    if (!std::filesystem::is_regular_file(p)) {
      std::cout << "TESSERA_SKIP: " << p.string()
                << " is missing (set TESSERA_DATA_DIR to the shared data folder)" << std::endl;
      return false;
    }
  }
  return true;
}

inline bool have_real_tokenizers() {
  return have_shared_files({"tokenizers/deepseek-v3/tokenizer.json",
                            "tokenizers/gpt2/encoder.json", "tokenizers/gpt2/vocab.bpe"});
}

}  // namespace tessera::test
