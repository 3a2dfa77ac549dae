// The playground page served at "/": server/playground.html, embedded at build time
// (embed.cmake writes its bytes into playground_html.cpp).
#pragma once

#include <string>

namespace mp {
const std::string& playground_html();
}
