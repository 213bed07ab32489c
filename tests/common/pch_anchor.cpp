// The translation unit that carries the tests' precompiled Boost.Test header
// (tests/CMakeLists.txt); it defines nothing itself.
#include <boost/test/unit_test.hpp>
