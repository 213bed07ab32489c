// tessera/core/error.hpp — the one exception type tessera throws.
//
// A broken precondition (shape mismatch, bad config, corrupt file, out-of-range id) is the
// caller's bug, so it is reported loudly with enough context to fix it: the operation,
// what was expected and what was found. Nothing is silently truncated or clamped.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace tessera {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

// Throws tessera::Error whose message is the streamed concatenation of `parts`.
template <class... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw Error(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace tessera

// TESSERA_CHECK(cond, parts...) throws tessera::Error("<parts...>") when cond is false.
// A macro rather than a function so the message is only built on failure.
#define TESSERA_CHECK(cond, ...)                      \
  do {                                                \
    if (!(cond)) ::tessera::fail(__VA_ARGS__);        \
  } while (false)
