# GCC's _tile_loadconfig defect, worked around for ggml's AMX kernels.
#
# GCC 12's amxtileintrin.h declares ldtilecfg's 64-byte operand as an 8-byte
# read ("m" (*(const void **)cfg)), so dead-store elimination drops the tile
# rows/columns ggml's amx/mmq.cpp writes just before it: ldtilecfg loads a
# palette with no tiles and the first tilezero raises SIGILL on every AMX
# processor. Keeping the stores in that one file fixes it. The check reads the
# compiler's own header, so a fixed GCC is left alone.
#
# Used by pyllama's CMakeLists.txt (after add_subdirectory of llama.cpp) and,
# as CMAKE_PROJECT_INCLUDE, by bench/native.py's build of llama.cpp's own tools,
# so both get the same code.
include_guard(GLOBAL)

function(pyllama_gcc_amx_workaround llama_dir)
  set(PYLLAMA_AMX_DSE_WORKAROUND OFF PARENT_SCOPE)
  set(_mmq "${llama_dir}/ggml/src/ggml-cpu/amx/mmq.cpp")
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "GNU" OR NOT EXISTS "${_mmq}")
    return()
  endif()
  execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=include/amxtileintrin.h
                  OUTPUT_VARIABLE _header OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(NOT EXISTS "${_header}")
    return()
  endif()
  file(STRINGS "${_header}" _narrow REGEX "ldtilecfg.*\\(const void \\*\\*\\)")
  if(_narrow)
    set_source_files_properties("${_mmq}" DIRECTORY "${llama_dir}/ggml/src"
                                PROPERTIES COMPILE_OPTIONS "-fno-tree-dse;-fno-dse")
    set(PYLLAMA_AMX_DSE_WORKAROUND ON PARENT_SCOPE)
    message(STATUS "pyllama: ${_header} narrows ldtilecfg's operand: ggml's amx/mmq.cpp built with -fno-tree-dse -fno-dse")
  endif()
endfunction()

# As CMAKE_PROJECT_INCLUDE of a plain llama.cpp build: run once every directory is added.
if(PYLLAMA_AMX_WORKAROUND_DEFER)
  cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL pyllama_gcc_amx_workaround "${CMAKE_SOURCE_DIR}")
endif()
