# Writes OUT, a C++ source defining mp::playground_html() with the bytes of IN.
# usage: cmake -DIN=page.html -DOUT=page.cpp -P embed.cmake
file(READ "${IN}" hex HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," bytes "${hex}")
file(WRITE "${OUT}" "// Generated from ${IN} by embed.cmake: do not edit.\n#include \"playground.h\"\n\nnamespace mp {\nnamespace {\nconst char kBytes[] = {${bytes}};\n}  // namespace\nconst std::string& playground_html() {\n  static const std::string page(kBytes, sizeof kBytes);\n  return page;\n}\n}  // namespace mp\n")
