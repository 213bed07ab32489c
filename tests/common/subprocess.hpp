// tests/common/subprocess.hpp — how a test runs its Python reference script.
//
// The cross-checks against Python packages (gguf, tokenizers, numpy) run a script as a child
// process, hand it files in a scratch folder and read its JSON back. Each test asks first which
// interpreter imports the modules it needs, so a machine without them reports the test skipped
// instead of failing it.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <initializer_list>
#include <string>

namespace tessera::test {

// Runs `cmd` through /bin/sh and returns what it printed on stdout; *status is its exit code, or
// -1 when it could not start or did not exit normally.
inline std::string run_capture(const std::string& cmd, int* status) {
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string out;
  if (!pipe) {
    *status = -1;
    return out;
  }
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  const int rc = pclose(pipe);
  *status = WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  return out;
}

// The first of `interpreters` that imports `modules` ("numpy, gguf"), or "" when none does. The
// default list is the PATH's python3 (pyenv's, where the packages are installed) and then the
// system's.
inline std::string python_with(const std::string& modules,
                               std::initializer_list<const char*> interpreters = {
                                   "python3", "/usr/bin/python3"}) {
  for (const char* py : interpreters) {
    const std::string cmd = std::string(py) + " -c 'import " + modules + "' >/dev/null 2>&1";
    if (std::system(cmd.c_str()) == 0) return py;
  }
  return {};
}

// A scratch folder "<prefix>_<pid>" in the temporary directory, created: the process id keeps
// test programs running at the same time (ctest -j) apart.
inline std::filesystem::path scratch_dir(const std::string& prefix) {
  const std::filesystem::path d =
      std::filesystem::temp_directory_path() / (prefix + "_" + std::to_string(::getpid()));
  std::filesystem::create_directories(d);
  return d;
}

}  // namespace tessera::test
