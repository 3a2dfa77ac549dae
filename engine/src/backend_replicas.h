#pragma once

#include <chrono>

#include "multipole/multipole.h"

namespace mp {
// One backend over several: parts[i] (all of the same model and slot count) runs on the device
// named devices[i]; global slot s is slot s / N of part s % N. Each part keeps all of its slots
// allocated; this backend decides which are free. The per-device threads poll for `spin`
// (DeviceThreads) before sleeping.
std::unique_ptr<Backend> make_replica_backend(std::vector<std::unique_ptr<Backend>> parts,
                                              std::vector<std::string> devices,
                                              std::chrono::microseconds spin);
}  // namespace mp
