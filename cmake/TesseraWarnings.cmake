# Warnings for tessera's own targets (tests, examples, benchmarks). The INTERFACE library does
# not force them on users; users get clean headers because our own builds are -Wall -Wextra.
function(tessera_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wno-unused-parameter>)
endfunction()
