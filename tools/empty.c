/* empty translation unit: CMakeLists.txt asks the compiler for -march=native's macros */
