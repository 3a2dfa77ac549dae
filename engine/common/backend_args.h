// The backend options every tool reads alike: --backend, --threads, the CPU's product flags, and
// --slots and --devices in the tools that take them (check_known refuses them in the others).
#pragma once

#include "args.h"
#include "multipole/multipole.h"

namespace mp::cli {

inline BackendOptions backend_from_args(const Args& a, int default_slots) {
  BackendOptions bo;
  bo.kind = a.str("backend", "auto");
  bo.n_slots = static_cast<int>(a.integer("slots", default_slots));
  bo.n_threads = static_cast<int>(a.integer("threads", 0));
  bo.cpu_fp32_products = a.has("cpu-fp32-products");
  bo.cpu_bf16_activations = a.has("cpu-bf16-activations");
  if (a.has("devices")) bo.devices = parse_devices(a.str("devices"), bo.kind);
  return bo;
}

}  // namespace mp::cli
