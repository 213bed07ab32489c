# Every dependency comes from Debian's packages (the README's commands install them).
find_package(Eigen3 3.4 REQUIRED NO_MODULE)
find_package(OpenMP REQUIRED COMPONENTS CXX)
find_package(nlohmann_json 3 REQUIRED)

find_library(TESSERA_OPENBLAS_LIBRARY NAMES openblas)
if(TESSERA_OPENBLAS_LIBRARY)
  set(TESSERA_HAVE_OPENBLAS ON)
else()
  set(TESSERA_HAVE_OPENBLAS OFF)
endif()

# oneDNN is found by hand: Debian's dnnl-config.cmake insists on OpenCL development files
# (its GPU runtime), which a CPU build does not need.
find_library(TESSERA_DNNL_LIBRARY NAMES dnnl)
find_path(TESSERA_DNNL_INCLUDE_DIR NAMES oneapi/dnnl/dnnl.hpp)
if(TESSERA_DNNL_LIBRARY AND TESSERA_DNNL_INCLUDE_DIR)
  set(TESSERA_HAVE_DNNL ON)
else()
  set(TESSERA_HAVE_DNNL OFF)
endif()

# Test and benchmark dependencies only.
if(TESSERA_BUILD_TESTS OR TESSERA_BUILD_BENCHMARKS)
  find_package(Boost 1.74 REQUIRED COMPONENTS unit_test_framework)
  find_package(Torch QUIET)
  if(TORCH_FOUND)
    set(TESSERA_HAVE_TORCH ON)
  else()
    set(TESSERA_HAVE_TORCH OFF)
  endif()
endif()
