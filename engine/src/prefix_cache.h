// Snapshots of sequence states after token prefixes, so that a prompt starting like an earlier one
// reads only what differs. A snapshot is a whole state (about 1 MiB, whatever the prefix length),
// taken at every multiple of `block` tokens and at the end of each prompt, keyed by chained block
// hashes (vLLM's scheme) and checked against the tokens on a hit. Two tiers, one LRU order: backend
// slots set aside for the cache (copy_slot: no host round trip), then host memory (save_slot bytes);
// a snapshot leaving the slots moves to the host, one leaving the host is dropped.
#pragma once

#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <unordered_map>
#include <vector>

#include "multipole/multipole.h"

namespace mp {

class PrefixCache {
 public:
  // Hash of `tokens` chained onto `seed`; replaceable so that tests can force collisions.
  using Hasher = uint64_t (*)(uint64_t seed, std::span<const int> tokens);
  static uint64_t default_hash(uint64_t seed, std::span<const int> tokens);

  struct Options {
    int block = 4096;        // snapshot spacing, tokens
    size_t host_bytes = 0;   // host tier capacity
    std::vector<int> slots;  // backend slots the cache owns (the first tier)
  };
  PrefixCache(Backend& backend, Options opts, Hasher hash = default_hash);

  int block() const { return opts_.block; }
  // Restores into `slot` the longest cached prefix of `tokens` no longer than `limit` tokens and
  // returns its length (0: nothing cached, the slot untouched).
  size_t restore(std::span<const int> tokens, size_t limit, int slot);
  // Snapshots `slot`, whose state is exactly (*tokens)[0, n), unless that prefix is cached.
  void store(const std::shared_ptr<const std::vector<int>>& tokens, size_t n, int slot);

  PrefixCacheStats stats() const;

 private:
  struct Entry {
    std::shared_ptr<const std::vector<int>> tokens;  // the prefix is tokens[0, n)
    size_t n = 0;
    uint64_t anchor = 0;  // hash chain up to the last block boundary at or before n
    int slot = -1;        // in a cache slot, or
    std::vector<uint8_t> bytes;  // on the host
  };
  using Lru = std::list<Entry>;  // most recently used first

  // Hash chain values at 0, block, 2*block, ... up to `upto` tokens.
  std::vector<uint64_t> chain(std::span<const int> tokens, size_t upto) const;
  static bool same_prefix(const Entry& e, std::span<const int> tokens);
  Lru::iterator find(std::span<const int> tokens, size_t limit, const std::vector<uint64_t>& h);
  void touch(Lru::iterator it);
  int take_slot();                    // a free cache slot, demoting the oldest if all are taken
  bool make_host_room(size_t bytes);  // drops the oldest host entries; false: never fits
  void drop(Lru::iterator it);

  Backend& backend_;
  Options opts_;
  Hasher hash_;
  Lru lru_;
  std::unordered_multimap<uint64_t, Lru::iterator> by_anchor_;
  std::vector<int> free_slots_;
  size_t host_used_ = 0;
  PrefixCacheStats st_;
};

}  // namespace mp
