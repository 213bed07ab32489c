// tessera/version.hpp — the library version (CMakeLists.txt checks that its project()
// version says the same).
#pragma once

#define TESSERA_VERSION_MAJOR 0
#define TESSERA_VERSION_MINOR 1
#define TESSERA_VERSION_PATCH 0

namespace tessera {
inline constexpr const char* version_string() { return "tessera 0.1.0"; }
}  // namespace tessera
