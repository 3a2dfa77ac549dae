// Persistent sessions: a sequence's state (about 1 MiB at any length) kept under a name and
// continued by later requests, which then read only their new tokens. Kept in memory and, with a
// store, as one record per session (the state, its position, the model's identity, a checksum),
// reloaded after a restart. A session serves one request at a time.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "multipole/multipole.h"

namespace mp::sessions {

// What a session holds between requests.
struct State {
  std::shared_ptr<const std::vector<uint8_t>> bytes;  // Backend::save_slot; null: empty
  int unfed_token = -1;  // the last generated token: the next request's prompt starts with it
  int64_t position = 0;  // tokens in the session, the unfed one included
};

struct Info {
  std::string id;
  int64_t position = 0;
  size_t bytes = 0;                  // the state's bytes
  int64_t created = 0, updated = 0;  // Unix seconds
  bool busy = false;                 // a request is running on it
  uint64_t version = 0;              // of its record: 1 when first stored, +1 per write
};

// One session as bytes: what a store keeps. Layout: "MPSESS01", a little-endian u32 header length,
// the header (JSON: id, model, position, unfed_token, created, updated, version), the state's
// bytes, then hash_bytes of everything before. decode_record() throws Error naming what is wrong.
std::string encode_record(const Info& info, const std::string& model, const State& state);
struct Record {
  Info info;
  std::string model;
  State state;
};
Record decode_record(std::string_view bytes, bool header_only = false);

// A store that cannot be reached (down, timed out): session requests get 503, others go on.
struct StoreUnavailable : Error {
  using Error::Error;
};

// Where records live. The directory store is the local one, written by one server; a shared store
// (Redis, issue 19) lets several servers continue each other's sessions.
class Store {
 public:
  virtual ~Store() = default;
  // Writes the record when the stored one's version is `expected` (0: none stored) and returns
  // true; false when another server wrote it meanwhile. Durable on return.
  virtual bool put(const std::string& id, const std::string& record, uint64_t expected) = 0;
  virtual std::optional<std::string> get(const std::string& id) = 0;
  virtual bool remove(const std::string& id) = 0;  // true when it was there
  // Every stored record's header (Record::info and model), for the index at start-up.
  virtual std::vector<Record> scan(std::vector<std::string>* problems) = 0;
  // Shared stores: other servers write it too, so what one holds in memory may be stale, and a
  // request takes the session's claim in the store (one server at a time; false: another holds
  // it). A claim lapses after a while, so a crashed server's sessions do not stay locked; put's
  // version check still keeps a turn that outlived its claim from overwriting a newer one.
  virtual bool shared() const { return false; }
  virtual bool claim(const std::string&) { return true; }
  virtual void unclaim(const std::string&) {}
};

// One file per session, `<dir>/<id>.session`, written atomically (temporary file, fsync, rename).
std::unique_ptr<Store> directory_store(const std::string& dir);

struct Options {
  size_t max_sessions = 10000;
  size_t max_store_bytes = 0;  // 0: no cap; beyond it, the least recently used are removed
  size_t memory_bytes = size_t(256) << 20;  // states cached in memory when a store holds them
};

struct Stats {
  size_t sessions = 0, busy = 0, memory_bytes = 0, store_bytes = 0;
  uint64_t created = 0, removed = 0, evicted = 0, loads = 0, saves = 0;
  uint64_t store_errors = 0;  // operations that found the store unavailable
  uint64_t store_calls = 0;   // operations on the store, and the time they took
  double store_seconds = 0;
  uint64_t misses = 0;  // requests naming a session that does not exist (404)
};

// The sessions of one server. Errors are api-shaped: 404 (no such session), 409 (busy, exists,
// another model's, written by another server during the turn), 400 (a bad id), 503 (the store
// is unavailable). With a shared store the map below is a cache of the store, which holds the truth.
class Sessions {
 public:
  // model: Model::identity(); store: null keeps sessions in memory only (max_sessions of them).
  Sessions(std::string model, std::unique_ptr<Store> store, Options opts,
           std::vector<std::string>* problems = nullptr);
  ~Sessions();

  // A request's hold on one session, released on destruction; commit() stores the new state.
  class Lease {
   public:
    Lease(Lease&&) noexcept;
    ~Lease();
    const std::string& id() const { return id_; }
    const State& state() const { return state_; }
    Info commit(State next);

   private:
    friend class Sessions;
    Lease(Sessions* owner, std::string id, State state);
    Sessions* owner_;
    std::string id_;
    State state_;
  };

  // id: empty for a generated one ("sess-" and 16 hex digits). Refuses an id in use.
  Lease create(const std::string& id);
  Lease acquire(const std::string& id);
  Info fork(const std::string& from, const std::string& id);
  Info info(const std::string& id) const;
  std::vector<Info> list() const;
  void remove(const std::string& id);
  Stats stats() const;

 private:
  struct Entry {
    Info info;
    std::string model;  // who saved it (a store may hold another model's sessions)
    std::shared_ptr<const std::vector<uint8_t>> bytes;  // null: only in the store (or empty)
    int unfed_token = -1;
    size_t record_bytes = 0;  // in the store
    uint64_t used = 0;        // LRU clock
  };
  Entry& get(const std::string& id);  // 404 when absent; call with mu_ held
  bool shared() const { return store_ && store_->shared(); }
  State load(Entry& e);               // the state, from memory or the store
  Lease acquire_shared(const std::string& id);
  // The stored record (and its size); 404 when the store lacks it. Call with mu_ free.
  Record fetch(const std::string& id, size_t* record_bytes = nullptr) const;
  void unclaim(const std::string& id);  // a store that is down: counted, the claim lapses
  template <class F>
  auto guard(F&& store_call) const -> decltype(store_call());  // StoreUnavailable: 503, counted
  void save(const std::string& id, const State& s, Info& info);
  void release(const std::string& id);
  void make_room(size_t incoming_record);  // evicts least recently used idle sessions
  void trim_memory();
  void drop(std::map<std::string, Entry>::iterator it);  // from the map, with its bytes; mu_ held
  std::string new_id() const;

  const std::string model_;
  std::unique_ptr<Store> store_;
  Options opts_;
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;
  uint64_t clock_ = 0;
  Stats st_;
  mutable std::atomic<uint64_t> store_errors_{0}, store_calls_{0}, store_nanos_{0}, misses_{0};
  [[noreturn]] void throw_missing(const std::string& id) const;  // a 404, counted
};

int64_t unix_now();

}  // namespace mp::sessions
