#include "prefix_cache.h"

#include <algorithm>
#include <cstring>

namespace mp {

uint64_t PrefixCache::default_hash(uint64_t seed, std::span<const int> tokens) {
  std::vector<uint8_t> bytes(8 + tokens.size_bytes());
  std::memcpy(bytes.data(), &seed, 8);
  if (!tokens.empty()) std::memcpy(bytes.data() + 8, tokens.data(), tokens.size_bytes());
  return hash_bytes(bytes);
}

PrefixCache::PrefixCache(Backend& backend, Options opts, Hasher hash)
    : backend_(backend), opts_(std::move(opts)), hash_(hash), free_slots_(opts_.slots) {
  if (opts_.block <= 0) throw Error("the prefix cache's block must be positive");
  std::reverse(free_slots_.begin(), free_slots_.end());  // hand out the lowest first
  st_.slots = opts_.slots.size();
  st_.host_capacity = opts_.host_bytes;
}

std::vector<uint64_t> PrefixCache::chain(std::span<const int> tokens, size_t upto) const {
  const size_t B = opts_.block;
  std::vector<uint64_t> h = {hash_(0, {})};
  for (size_t at = B; at <= upto; at += B) h.push_back(hash_(h.back(), tokens.subspan(at - B, B)));
  return h;
}

bool PrefixCache::same_prefix(const Entry& e, std::span<const int> tokens) {
  return tokens.size() >= e.n && std::equal(e.tokens->begin(), e.tokens->begin() + e.n,
                                            tokens.begin());
}

// The longest entry that is a prefix of `tokens` no longer than `limit`. Entries hang under the
// chain value of their last whole block: the search walks from the longest block down and stops
// at the first block with a match, since every entry there is longer than those below.
PrefixCache::Lru::iterator PrefixCache::find(std::span<const int> tokens, size_t limit,
                                             const std::vector<uint64_t>& h) {
  for (size_t j = h.size(); j-- > 0;) {
    auto best = lru_.end();
    auto [lo, hi] = by_anchor_.equal_range(h[j]);
    for (auto it = lo; it != hi; ++it) {
      const Entry& e = *it->second;
      if (e.n / opts_.block != j || e.n > limit) continue;  // another block's (a hash collision)
      if ((best == lru_.end() || e.n > best->n) && same_prefix(e, tokens)) best = it->second;
    }
    if (best != lru_.end()) return best;
  }
  return lru_.end();
}

size_t PrefixCache::restore(std::span<const int> tokens, size_t limit, int slot) {
  ++st_.lookups;
  limit = std::min(limit, tokens.size());
  const auto it = find(tokens, limit, chain(tokens, limit));
  if (it == lru_.end() || it->n == 0) return 0;
  if (it->slot >= 0)
    backend_.copy_slot(it->slot, slot);
  else
    backend_.load_slot(slot, it->bytes);
  ++st_.hits;
  st_.cached_tokens += it->n;
  touch(it);
  return it->n;
}

void PrefixCache::store(const std::shared_ptr<const std::vector<int>>& tokens, size_t n,
                        int slot) {
  if (n == 0) return;
  const std::span<const int> prefix(tokens->data(), n);
  const std::vector<uint64_t> h = chain(prefix, n);
  const auto hit = find(prefix, n, h);
  if (hit != lru_.end() && hit->n == n) return touch(hit);  // already cached
  Entry e{tokens, n, h.back(), -1, {}};
  e.slot = take_slot();
  if (e.slot >= 0) {
    backend_.copy_slot(slot, e.slot);
  } else {
    std::vector<uint8_t> bytes = backend_.save_slot(slot);
    if (!make_host_room(bytes.size())) return;
    host_used_ += bytes.size();
    e.bytes = std::move(bytes);
  }
  lru_.push_front(std::move(e));
  by_anchor_.emplace(h.back(), lru_.begin());
  ++st_.stores;
}

void PrefixCache::touch(Lru::iterator it) { lru_.splice(lru_.begin(), lru_, it); }

int PrefixCache::take_slot() {
  if (!free_slots_.empty()) {
    const int s = free_slots_.back();
    free_slots_.pop_back();
    return s;
  }
  for (auto it = lru_.rbegin(); it != lru_.rend(); ++it) {
    if (it->slot < 0) continue;
    // The oldest entry in a slot moves to the host (if it fits) and gives its slot up.
    const int s = it->slot;
    std::vector<uint8_t> bytes = backend_.save_slot(s);
    const auto entry = std::prev(it.base());
    entry->slot = -1;
    if (make_host_room(bytes.size())) {
      host_used_ += bytes.size();
      entry->bytes = std::move(bytes);
    } else {
      drop(entry);
    }
    return s;
  }
  return -1;  // the cache owns no slots
}

bool PrefixCache::make_host_room(size_t bytes) {
  if (bytes > opts_.host_bytes) return false;
  for (auto it = lru_.end(); host_used_ + bytes > opts_.host_bytes && it != lru_.begin();) {
    --it;
    if (it->slot >= 0) continue;
    const auto older = it;
    it = std::next(it);
    drop(older);
  }
  return true;
}

void PrefixCache::drop(Lru::iterator it) {
  auto [lo, hi] = by_anchor_.equal_range(it->anchor);
  for (auto i = lo; i != hi; ++i)
    if (i->second == it) {
      by_anchor_.erase(i);
      break;
    }
  if (it->slot >= 0) free_slots_.push_back(it->slot);
  host_used_ -= it->bytes.size();
  lru_.erase(it);
  ++st_.evictions;
}

PrefixCacheStats PrefixCache::stats() const {
  PrefixCacheStats s = st_;
  s.host_bytes = host_used_;
  s.entries_in_slots = opts_.slots.size() - free_slots_.size();
  s.entries_on_host = lru_.size() - s.entries_in_slots;
  return s;
}

}  // namespace mp
