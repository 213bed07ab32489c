// The Boost.Test runner's main() for every test program built with the shared precompiled
// header (tests/CMakeLists.txt says why it lives here and not in each program).
#define BOOST_TEST_MODULE tessera
#include <boost/test/unit_test.hpp>
