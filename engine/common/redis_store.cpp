#include "redis_store.h"

#include <hiredis/hiredis.h>

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <thread>

#include "api.h"

namespace mp::sessions {

namespace {

// KEYS[1] a claim; ARGV[1] its holder's token: only the holder's claim is dropped.
constexpr const char* kUnclaim = R"lua(
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
)lua";

// KEYS[1] a claim; ARGV[1] the new token ("<server>/<n>"), ARGV[2] the claim's expiry (ms),
// ARGV[3] the key prefix. Taken when free, or when its holder's liveness key
// (<prefix><server>:alive) is gone: that server died (or stalled past the liveness time, when
// the compare-and-set on the record still keeps its turn from overwriting a newer one).
constexpr const char* kClaim = R"lua(
local held = redis.call('GET', KEYS[1])
if held then
  local holder = string.match(held, '^([^/]*)/') or ''
  if redis.call('EXISTS', ARGV[3] .. holder .. ':alive') == 1 then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
)lua";

constexpr const char* kClaimSuffix = ":claim";
constexpr const char* kAliveSuffix = ":alive";
constexpr size_t kHeadBytes = 4096;  // a record's header fits (ids and model ids are short)

// SCAN's MATCH is a glob: the prefix matches itself only.
std::string glob_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '*' || c == '?' || c == '[' || c == ']' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}

class RedisStore final : public Store {
 public:
  explicit RedisStore(RedisOptions o)
      : o_(std::move(o)), server_(random_hex()), heartbeat_([this] { beat(); }) {}
  ~RedisStore() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    stop_.notify_all();
    heartbeat_.join();
    if (c_) redisFree(c_);
  }

  bool shared() const override { return true; }

  bool put(const std::string& id, const std::string& record, uint64_t expected) override {
    if (record.size() > o_.max_record_bytes)
      throw api::ApiError(413, "session '" + id + "' needs " + std::to_string(record.size()) +
                                   " bytes, more than the store's cap of " +
                                   std::to_string(o_.max_record_bytes),
                          "session", "session_too_large");
    // A compare-and-set: WATCH, the stored header's version, then MULTI/SET/EXEC, which Redis
    // aborts if the key changed after the WATCH. (A Lua script would copy the record twice.)
    const std::string k = key(id);
    std::lock_guard<std::mutex> lock(mu_);
    append({"WATCH", k});
    append({"GETRANGE", k, "0", std::to_string(kHeadBytes - 1)});
    reply();
    if (stored_version(reply()) != std::optional<uint64_t>(expected)) {
      command({"UNWATCH"});
      return false;
    }
    append({"MULTI"});
    if (o_.ttl_s > 0)
      append({"SET", k, record, "PX", std::to_string(o_.ttl_s * 1000)});
    else
      append({"SET", k, record});
    append({"EXEC"});
    reply();
    reply();
    return reply()->type == REDIS_REPLY_ARRAY;  // nil: aborted
  }

  std::optional<std::string> get(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Reply r = command({"GET", key(id)});
    if (r->type == REDIS_REPLY_NIL) return std::nullopt;
    return std::string(r->str, r->len);
  }

  bool remove(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    return command({"DEL", key(id)})->integer > 0;
  }

  bool claim(const std::string& id) override {
    const std::string token = server_ + "/" + random_hex();
    std::lock_guard<std::mutex> lock(mu_);
    if (!alive_) refresh_alive();  // before the first claim: others must see this server alive
    Reply r = command({"EVAL", kClaim, "1", key(id) + kClaimSuffix, token,
                       std::to_string(o_.claim_ms), o_.prefix});
    if (r->integer == 0) return false;
    claims_[id] = token;
    return true;
  }

  void unclaim(const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = claims_.find(id);
    if (it == claims_.end()) return;
    const std::string token = std::move(it->second);
    claims_.erase(it);
    command({"EVAL", kUnclaim, "1", key(id) + kClaimSuffix, token});
  }

  // SCAN for the keys, then each record's header and size, pipelined.
  std::vector<Record> scan(std::vector<std::string>* problems) override {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> keys;
    std::string cursor = "0";
    do {
      Reply r = command({"SCAN", cursor, "MATCH", glob_escape(o_.prefix) + "*", "COUNT", "1000"});
      if (r->type != REDIS_REPLY_ARRAY || r->elements != 2) unavailable("unexpected SCAN reply");
      cursor.assign(r->element[0]->str, r->element[0]->len);
      for (size_t i = 0; i < r->element[1]->elements; ++i) {
        std::string k(r->element[1]->element[i]->str, r->element[1]->element[i]->len);
        if (!k.ends_with(kClaimSuffix) && !k.ends_with(kAliveSuffix)) keys.push_back(std::move(k));
      }
    } while (cursor != "0");
    for (const auto& k : keys) {
      append({"GETRANGE", k, "0", std::to_string(kHeadBytes - 1)});
      append({"STRLEN", k});
    }
    std::vector<Record> out;
    for (const auto& k : keys) {
      Reply head = reply(), size = reply();
      if (head->type != REDIS_REPLY_STRING || head->len == 0) continue;  // expired meanwhile
      try {
        Record r = decode_record(std::string_view(head->str, head->len), true);
        if (o_.prefix + r.info.id != k) throw Error("its header names session '" + r.info.id + "'");
        r.info.bytes = static_cast<size_t>(size->integer);  // the record's size
        out.push_back(std::move(r));
      } catch (const std::exception& e) {
        if (problems) problems->push_back("session key '" + k + "': " + e.what());
      }
    }
    return out;
  }

 private:
  using Reply = std::unique_ptr<redisReply, void (*)(void*)>;

  std::string key(const std::string& id) const { return o_.prefix + id; }

  static std::string random_hex() {
    static thread_local std::mt19937_64 rng(std::random_device{}());
    char b[17];
    std::snprintf(b, sizeof b, "%016llx", static_cast<unsigned long long>(rng()));
    return b;
  }

  // This server's liveness key, which its claims name (kClaim); with mu_ held.
  void refresh_alive() {
    command({"SET", o_.prefix + server_ + kAliveSuffix, "1", "PX", std::to_string(o_.liveness_ms)});
    alive_ = true;
  }

  // The heartbeat thread: refreshes the liveness key three times per liveness time, once this
  // server has claimed something; a store that is down is retried on the next beat.
  void beat() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_.wait_for(lock, std::chrono::milliseconds(o_.liveness_ms / 3),
                           [this] { return stopping_; })) {
      try {
        if (alive_) refresh_alive();
      } catch (const StoreUnavailable&) {
        alive_ = false;  // the next claim writes it first
      }
    }
  }

  // The version in a record's header (GETRANGE's reply); 0: no record; none: unreadable.
  static std::optional<uint64_t> stored_version(const Reply& head) {
    if (head->len == 0) return 0;
    try {
      return decode_record(std::string_view(head->str, head->len), true).info.version;
    } catch (const Error&) {
      return std::nullopt;
    }
  }

  [[noreturn]] void unavailable(const std::string& why) {
    if (c_) redisFree(c_);
    c_ = nullptr;  // connect again on the next call
    throw StoreUnavailable("redis at " + o_.host + ":" + std::to_string(o_.port) + ": " + why);
  }

  void connect() {
    if (c_) return;
    const timeval tv{static_cast<time_t>(o_.timeout_ms / 1000),
                     static_cast<suseconds_t>(o_.timeout_ms % 1000 * 1000)};
    c_ = redisConnectWithTimeout(o_.host.c_str(), o_.port, tv);
    if (!c_) unavailable("cannot allocate a connection");
    if (c_->err) unavailable(c_->errstr);
    if (redisSetTimeout(c_, tv) != REDIS_OK) unavailable(c_->errstr);
  }

  void append(const std::vector<std::string>& args) {
    connect();
    std::vector<const char*> argv;
    std::vector<size_t> lens;
    for (const auto& a : args) {
      argv.push_back(a.data());
      lens.push_back(a.size());
    }
    if (redisAppendCommandArgv(c_, static_cast<int>(args.size()), argv.data(), lens.data()) != REDIS_OK)
      unavailable(c_->errstr);
  }

  // The next reply; an error reply (a loading or full Redis, a failed script) counts as down.
  Reply reply() {
    void* raw = nullptr;
    if (redisGetReply(c_, &raw) != REDIS_OK || !raw) unavailable(c_->err ? c_->errstr : "no reply");
    Reply r(static_cast<redisReply*>(raw), freeReplyObject);
    if (r->type == REDIS_REPLY_ERROR) unavailable(std::string(r->str, r->len));
    return r;
  }

  Reply command(const std::vector<std::string>& args) {  // with mu_ held
    append(args);
    return reply();
  }

  const RedisOptions o_;
  const std::string server_;                   // this server's id in its claims
  std::mutex mu_;                              // one connection, one command at a time
  redisContext* c_ = nullptr;
  std::map<std::string, std::string> claims_;  // session -> this server's claim token
  bool alive_ = false;                         // its liveness key written (and kept fresh)
  bool stopping_ = false;
  std::condition_variable stop_;
  std::thread heartbeat_;                      // last: started once the rest is set up
};

}  // namespace

RedisOptions parse_redis_url(const std::string& url, RedisOptions o) {
  const std::string scheme = "redis://";
  auto bad = [&](const std::string& why) {
    return Error("session store '" + url + "': " + why + " (expected redis://host[:port][/prefix])");
  };
  if (!url.starts_with(scheme)) throw bad("not a redis:// URL");
  std::string rest = url.substr(scheme.size());
  const size_t slash = rest.find('/');
  if (slash != std::string::npos) {
    if (slash + 1 < rest.size()) o.prefix = rest.substr(slash + 1);
    rest.resize(slash);
  }
  const size_t colon = rest.rfind(':');
  o.host = rest.substr(0, colon);
  if (colon != std::string::npos) {
    const std::string port = rest.substr(colon + 1);
    if (port.empty() || port.size() > 5 ||
        !std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }) ||
        std::stoi(port) < 1 || std::stoi(port) > 65535)
      throw bad("bad port '" + port + "'");
    o.port = std::stoi(port);
  }
  if (o.host.empty()) throw bad("no host");
  return o;
}

std::unique_ptr<Store> redis_store(const RedisOptions& o) { return std::make_unique<RedisStore>(o); }

}  // namespace mp::sessions
