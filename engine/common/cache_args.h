// The prefix-cache options shared by the tools that run a scheduler (server, batch).
#pragma once

#include <algorithm>
#include <set>
#include <string>

#include "args.h"
#include "multipole/multipole.h"

namespace mp::cli {

inline const char* kPrefixCacheUsage =
    "  --prefix-block N  prefix cache: a snapshot every N prompt tokens and at\n"
    "                    each prompt's end (default 4096)\n"
    "  --prefix-cache-mib N  prefix snapshots kept in host memory (default 1024;\n"
    "                    0 and no slots: no prefix cache)\n"
    "  --prefix-cache-slots N  backend slots kept for snapshots, the fast tier\n"
    "                    (default 64 on CUDA, 0 on the CPU; shared by --devices)\n";

inline const std::set<std::string> kPrefixCacheOptions = {"prefix-block", "prefix-cache-mib",
                                                          "prefix-cache-slots"};

// Sets the scheduler's prefix-cache options and adds the cache's slots to the backend's.
inline void prefix_cache_from_args(const Args& a, BackendOptions& bo, SchedulerOptions& so) {
  const bool cuda = bo.kind == "cuda" || (bo.kind == "auto" && cuda_available());
  const long long block = a.integer("prefix-block", 4096), mib = a.integer("prefix-cache-mib", 1024),
                  slots = a.integer("prefix-cache-slots", cuda ? 64 : 0);
  if (block <= 0 || mib < 0 || slots < 0)
    a.fail("--prefix-block must be positive, --prefix-cache-mib and --prefix-cache-slots >= 0");
  so.prefix_block = static_cast<int>(block);
  so.prefix_cache_bytes = static_cast<size_t>(mib) << 20;
  // The scheduler takes them for the cache. With replicas (bo.n_slots is per device) each device
  // gets its share, rounded up; the scheduler's alloc_slot spreads them over the devices.
  const int replicas =
      bo.tensor_parallel == 0 ? std::max(1, static_cast<int>(bo.devices.size())) : 1;
  const int per_device = static_cast<int>((slots + replicas - 1) / replicas);
  so.prefix_cache_slots = per_device * replicas;
  bo.n_slots += per_device;
}

}  // namespace mp::cli
