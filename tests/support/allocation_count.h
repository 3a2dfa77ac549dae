// Heap allocations counted: allocation_count.cpp replaces the global operator new of the program
// it is linked into (a test or a bench of its own, so that nothing else runs with it).
#pragma once

#include <cstdint>

namespace mp::testing {
uint64_t allocations();  // operator new calls so far, all threads
}  // namespace mp::testing
