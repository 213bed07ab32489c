# Text-processing dependencies of the data cleaning pipeline (include/tessera/data/clean/):
# RE2 (regex filter), utf8proc (NFKC, character categories), xxHash (dedup hashes, used
# header-only) and OpenCC (traditional-to-simplified). Debian packages: libre2-dev
# libutf8proc-dev libxxhash-dev libopencc-dev (and opencc's data, pulled in by libopencc-dev).
#
# Defines the INTERFACE target tessera_text (alias tessera::text) that links what was found
# and defines TESSERA_HAVE_RE2 / _UTF8PROC / _XXHASH / _OPENCC for each. A missing library
# is not a configure error: the stage that needs it throws tessera::Error when constructed,
# naming the package to install (docs/data.md). Plain paths are used instead of imported
# targets so the target works from any directory that includes this file.
include_guard(GLOBAL)

find_path(TESSERA_RE2_INCLUDE_DIR NAMES re2/re2.h)
find_library(TESSERA_RE2_LIBRARY NAMES re2)
find_path(TESSERA_UTF8PROC_INCLUDE_DIR NAMES utf8proc.h)
find_library(TESSERA_UTF8PROC_LIBRARY NAMES utf8proc)
find_path(TESSERA_XXHASH_INCLUDE_DIR NAMES xxhash.h)
find_path(TESSERA_OPENCC_INCLUDE_DIR NAMES opencc/opencc.h)
find_library(TESSERA_OPENCC_LIBRARY NAMES opencc)
find_package(Threads)

add_library(tessera_text INTERFACE)
add_library(tessera::text ALIAS tessera_text)
target_link_libraries(tessera_text INTERFACE tessera)
set(_tessera_text_found "")
set(_tessera_text_missing "")
if(TESSERA_RE2_INCLUDE_DIR AND TESSERA_RE2_LIBRARY AND Threads_FOUND)
  target_compile_definitions(tessera_text INTERFACE TESSERA_HAVE_RE2=1)
  target_link_libraries(tessera_text INTERFACE ${TESSERA_RE2_LIBRARY} Threads::Threads)
  list(APPEND _tessera_text_found RE2)
else()
  list(APPEND _tessera_text_missing RE2)
endif()
if(TESSERA_UTF8PROC_INCLUDE_DIR AND TESSERA_UTF8PROC_LIBRARY)
  target_compile_definitions(tessera_text INTERFACE TESSERA_HAVE_UTF8PROC=1)
  target_link_libraries(tessera_text INTERFACE ${TESSERA_UTF8PROC_LIBRARY})
  list(APPEND _tessera_text_found utf8proc)
else()
  list(APPEND _tessera_text_missing utf8proc)
endif()
if(TESSERA_XXHASH_INCLUDE_DIR)
  target_compile_definitions(tessera_text INTERFACE TESSERA_HAVE_XXHASH=1)
  list(APPEND _tessera_text_found xxHash)
else()
  list(APPEND _tessera_text_missing xxHash)
endif()
if(TESSERA_OPENCC_INCLUDE_DIR AND TESSERA_OPENCC_LIBRARY)
  # opencc.h includes its C++ headers by bare name, so their folder goes on the path.
  target_include_directories(tessera_text INTERFACE ${TESSERA_OPENCC_INCLUDE_DIR}/opencc)
  target_compile_definitions(tessera_text INTERFACE TESSERA_HAVE_OPENCC=1)
  target_link_libraries(tessera_text INTERFACE ${TESSERA_OPENCC_LIBRARY})
  list(APPEND _tessera_text_found OpenCC)
else()
  list(APPEND _tessera_text_missing OpenCC)
endif()
message(STATUS "tessera::text found: ${_tessera_text_found}; missing: ${_tessera_text_missing}")
