// Sessions in Redis (issue 19): replicas of a server share one store, so any replica continues
// any session. One key per session, `<prefix><id>`, holding its record (sessions.h), written with a
// compare-and-set on the record's version and a TTL; `<prefix><id>:claim` while a request runs
// on it, naming its server, whose heartbeat keeps `<prefix><server>:alive` (RedisOptions::liveness_ms).
#pragma once

#include <memory>
#include <string>

#include "sessions.h"

namespace mp::sessions {

struct RedisOptions {
  std::string host = "127.0.0.1";
  int port = 6379;
  std::string prefix = "multipole:session:";
  int64_t ttl_s = 7 * 24 * 3600;               // a record expires this long after its last write; 0: never
  size_t max_record_bytes = size_t(64) << 20;  // a larger record is refused (413)
  int64_t claim_ms = 60000;   // a request's claim lapses after this (a server that died holding it)
  // A server's claims lapse at once when it has not refreshed its liveness key for this long (it
  // died, or stalled): a session whose server was killed mid-turn is free again within it.
  int64_t liveness_ms = 3000;
  int64_t timeout_ms = 2000;  // connecting, and each command: beyond, the store counts as down
};

// "redis://host[:port][/prefix]" into `o` (its other fields kept); throws Error naming what is wrong.
RedisOptions parse_redis_url(const std::string& url, RedisOptions o = {});

// Connects on first use and again after a failure; an unreachable Redis throws StoreUnavailable.
std::unique_ptr<Store> redis_store(const RedisOptions& o);

}  // namespace mp::sessions
