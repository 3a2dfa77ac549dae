#include "sessions.h"

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "api.h"

namespace mp::sessions {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr char kMagic[8] = {'M', 'P', 'S', 'E', 'S', 'S', '0', '1'};

api::ApiError not_found(const std::string& id) {
  return api::ApiError(404, "no session '" + id + "'", "session", "session_not_found");
}
api::ApiError conflict(const std::string& msg) {
  return api::ApiError(409, msg, "session", "session_conflict");
}
// A busy session is free again once its turn ends (or, on a dead server, once its claim lapses).
api::ApiError retry_soon(api::ApiError e) {
  e.retry_after_s = 1;
  return e;
}
api::ApiError busy(const std::string& id) {
  return retry_soon(conflict("session '" + id + "' is busy with another request"));
}
api::ApiError busy_elsewhere(const std::string& id) {
  return retry_soon(conflict("session '" + id + "' is busy with a request on another server"));
}
api::ApiError another_model(const std::string& id, const std::string& theirs, const std::string& ours) {
  return conflict("session '" + id + "' was saved by another model (" + theirs +
                  "); this server runs " + ours);
}
api::ApiError corrupt(const std::string& id, const Error& err) {
  return api::ApiError(500, "session '" + id + "': " + err.what(), "session", "session_corrupt",
                       "server_error");
}

// Ids become file names: letters, digits, '-' and '_', at most 64.
void check_id(const std::string& id) {
  const bool ok = !id.empty() && id.size() <= 64 &&
                  std::all_of(id.begin(), id.end(), [](char c) {
                    return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
                  });
  if (!ok)
    throw api::ApiError(400, "a session id is 1 to 64 letters, digits, '-' or '_'", "session",
                        "invalid_value");
}

class DirectoryStore final : public Store {
 public:
  explicit DirectoryStore(std::string dir) : dir_(std::move(dir)) {
    fs::create_directories(dir_);
    // Temporary files of writers killed mid-write: never a session, safe to drop.
    for (const auto& f : fs::directory_iterator(dir_))
      if (f.path().filename().string().find(".session.tmp-") != std::string::npos)
        fs::remove(f.path());
  }
  // One server writes a directory, and its Sessions write a session one request at a time:
  // the version is already checked.
  bool put(const std::string& id, const std::string& record, uint64_t) override {
    write_file_atomic(path(id), record);
    return true;
  }
  std::optional<std::string> get(const std::string& id) override {
    std::ifstream f(path(id), std::ios::binary | std::ios::ate);
    if (!f) return std::nullopt;
    std::string bytes(static_cast<size_t>(f.tellg()), '\0');  // one read, not char by char
    f.seekg(0);
    f.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!f) throw Error("reading '" + path(id) + "' failed");
    return bytes;
  }
  bool remove(const std::string& id) override { return fs::remove(path(id)); }
  std::vector<Record> scan(std::vector<std::string>* problems) override {
    std::vector<Record> out;
    for (const auto& f : fs::directory_iterator(dir_)) {
      if (f.path().extension() != ".session") continue;
      try {
        std::ifstream in(f.path(), std::ios::binary);
        std::string head(12, '\0');
        in.read(head.data(), 12);
        uint32_t n = 0;
        if (in.gcount() == 12) std::memcpy(&n, head.data() + 8, 4);
        if (n > (1u << 20)) throw Error("implausible header length (corrupt)");
        head.resize(12 + n);
        in.read(head.data() + 12, n);
        head.resize(12 + in.gcount());
        Record r = decode_record(head, true);
        r.info.bytes = fs::file_size(f.path());  // the record's size; corrected on load
        if (r.info.id + ".session" != f.path().filename().string())
          throw Error("its header names session '" + r.info.id + "'");
        out.push_back(std::move(r));
      } catch (const std::exception& e) {
        if (problems) problems->push_back("session file '" + f.path().string() + "': " + e.what());
      }
    }
    return out;
  }

 private:
  std::string path(const std::string& id) const { return (fs::path(dir_) / (id + ".session")).string(); }
  std::string dir_;
};

}  // namespace

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string encode_record(const Info& info, const std::string& model, const State& state) {
  const std::string header = json{{"id", info.id},
                                  {"model", model},
                                  {"position", state.position},
                                  {"unfed_token", state.unfed_token},
                                  {"created", info.created},
                                  {"updated", info.updated},
                                  {"version", info.version}}
                                 .dump();
  std::string out(kMagic, 8);
  const uint32_t n = static_cast<uint32_t>(header.size());
  out.append(reinterpret_cast<const char*>(&n), 4);
  out += header;
  if (state.bytes) out.append(reinterpret_cast<const char*>(state.bytes->data()), state.bytes->size());
  const uint64_t sum = hash_bytes({reinterpret_cast<const uint8_t*>(out.data()), out.size()});
  out.append(reinterpret_cast<const char*>(&sum), 8);
  return out;
}

Record decode_record(std::string_view bytes, bool header_only) {
  if (bytes.size() < 12 || std::memcmp(bytes.data(), kMagic, 8) != 0)
    throw Error("not a session record (bad magic)");
  uint32_t n;
  std::memcpy(&n, bytes.data() + 8, 4);
  if (bytes.size() < 12 + size_t(n) + (header_only ? 0 : 8))
    throw Error("the record is truncated");
  if (!header_only) {
    uint64_t stored;
    std::memcpy(&stored, bytes.data() + bytes.size() - 8, 8);
    if (stored != hash_bytes({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size() - 8}))
      throw Error("checksum mismatch (the record is corrupt)");
  }
  Record r;
  try {
    const json h = json::parse(bytes.substr(12, n));
    r.info.id = h.at("id").get<std::string>();
    r.model = h.at("model").get<std::string>();
    r.state.position = h.at("position").get<int64_t>();
    r.state.unfed_token = h.at("unfed_token").get<int>();
    r.info.created = h.at("created").get<int64_t>();
    r.info.updated = h.at("updated").get<int64_t>();
    r.info.version = h.value("version", uint64_t(0));  // files written before versions: 0
  } catch (const std::exception& e) {
    throw Error(std::string("bad record header: ") + e.what());
  }
  r.info.position = r.state.position;
  if (!header_only && bytes.size() > 12 + size_t(n) + 8) {
    const auto* p = reinterpret_cast<const uint8_t*>(bytes.data()) + 12 + n;
    r.state.bytes = std::make_shared<const std::vector<uint8_t>>(p, p + bytes.size() - 20 - n);
    r.info.bytes = r.state.bytes->size();
  }
  return r;
}

std::unique_ptr<Store> directory_store(const std::string& dir) {
  return std::make_unique<DirectoryStore>(dir);
}

Sessions::Sessions(std::string model, std::unique_ptr<Store> store, Options opts,
                   std::vector<std::string>* problems)
    : model_(std::move(model)), store_(std::move(store)), opts_(opts) {
  // A shared store is asked per session, when one is used: no index to read at start-up (and a
  // store that is down then does not stop the server).
  if (!store_ || shared()) return;
  for (Record& r : store_->scan(problems)) {
    Entry e;
    e.info = r.info;
    e.model = r.model;
    e.unfed_token = r.state.unfed_token;
    e.record_bytes = r.info.bytes;
    e.used = static_cast<uint64_t>(r.info.updated);  // older sessions leave first
    clock_ = std::max(clock_, e.used);
    st_.store_bytes += e.record_bytes;
    entries_.emplace(r.info.id, std::move(e));
  }
}

Sessions::~Sessions() = default;

Sessions::Lease::Lease(Sessions* owner, std::string id, State state)
    : owner_(owner), id_(std::move(id)), state_(std::move(state)) {}
Sessions::Lease::Lease(Lease&& o) noexcept
    : owner_(std::exchange(o.owner_, nullptr)), id_(std::move(o.id_)), state_(std::move(o.state_)) {}
Sessions::Lease::~Lease() {
  if (owner_) owner_->release(id_);
}

Info Sessions::Lease::commit(State next) {
  if (!owner_) throw Error("session lease already released");
  Info info;
  {
    std::lock_guard<std::mutex> lock(owner_->mu_);
    info = owner_->get(id_).info;
  }
  owner_->save(id_, next, info);  // the entry is ours (busy): no one else touches it
  state_ = std::move(next);
  return info;
}

Sessions::Entry& Sessions::get(const std::string& id) {
  auto it = entries_.find(id);
  if (it == entries_.end()) throw_missing(id);
  return it->second;
}

std::string Sessions::new_id() const {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  char b[32];
  std::snprintf(b, sizeof b, "sess-%016llx", static_cast<unsigned long long>(rng()));
  return b;
}

void Sessions::throw_missing(const std::string& id) const {
  ++misses_;
  throw not_found(id);
}

template <class F>
auto Sessions::guard(F&& store_call) const -> decltype(store_call()) {
  const auto t0 = std::chrono::steady_clock::now();
  struct Timed {  // counts the call however it ends
    const Sessions& s;
    std::chrono::steady_clock::time_point t0;
    ~Timed() {
      ++s.store_calls_;
      s.store_nanos_ += static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0)
              .count());
    }
  } timed{*this, t0};
  try {
    return store_call();
  } catch (const StoreUnavailable& e) {
    ++store_errors_;
    std::fprintf(stderr, "warning: session store: %s\n", e.what());
    throw api::ApiError(503, std::string("the session store is unavailable: ") + e.what(),
                        "session", "session_store_unavailable", "server_error");
  }
}

Record Sessions::fetch(const std::string& id, size_t* record_bytes) const {
  const auto bytes = guard([&] { return store_->get(id); });
  if (!bytes) throw_missing(id);
  if (record_bytes) *record_bytes = bytes->size();
  try {
    return decode_record(*bytes);
  } catch (const Error& err) {
    throw corrupt(id, err);
  }
}

Sessions::Lease Sessions::create(const std::string& requested) {
  std::string id = requested;
  bool claimed = false;
  if (shared()) {  // the id must be free in the store, and stays ours until the lease ends
    if (id.empty()) id = new_id();
    check_id(id);
    if (!guard([&] { return store_->claim(id); })) throw busy_elsewhere(id);
    claimed = true;
    try {
      if (guard([&] { return store_->get(id); })) throw conflict("session '" + id + "' exists");
      std::lock_guard<std::mutex> lock(mu_);
      auto it = entries_.find(id);  // removed by another server since this one used it
      if (it != entries_.end() && !it->second.info.busy) drop(it);
    } catch (...) {
      unclaim(id);
      throw;
    }
  }
  try {
    std::lock_guard<std::mutex> lock(mu_);
    if (id.empty()) {
      do id = new_id();
      while (entries_.count(id));
    }
    check_id(id);
    if (entries_.count(id)) throw conflict("session '" + id + "' exists");
    make_room(0);
    if (entries_.size() >= opts_.max_sessions)
      throw api::ApiError(429, "every one of the " + std::to_string(opts_.max_sessions) +
                                   " sessions is busy", "session", "too_many_sessions");
    Entry e;
    e.info.id = id;
    e.info.created = e.info.updated = unix_now();
    e.info.busy = true;
    e.model = model_;
    e.used = ++clock_;
    entries_.emplace(id, std::move(e));
    ++st_.created;
  } catch (...) {
    if (claimed) unclaim(id);
    throw;
  }
  return Lease(this, id, State{});
}

Sessions::Lease Sessions::acquire(const std::string& id) {
  if (shared()) return acquire_shared(id);
  Entry* e;
  {
    std::lock_guard<std::mutex> lock(mu_);
    e = &get(id);
    if (e->info.busy) throw busy(id);
    if (e->model != model_) throw another_model(id, e->model, model_);
    e->info.busy = true;
    e->used = ++clock_;
  }
  try {
    return Lease(this, id, load(*e));  // entries never move in the map; ours while busy
  } catch (...) {
    release(id);
    throw;
  }
}

// The session's claim in the store first (another server's request on it: 409), then its record
// as the store has it now: another server may have written it since this one last did.
Sessions::Lease Sessions::acquire_shared(const std::string& id) {
  check_id(id);
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(id);
    if (it != entries_.end() && it->second.info.busy) throw busy(id);
  }
  if (!guard([&] { return store_->claim(id); })) throw busy_elsewhere(id);
  try {
    size_t record_bytes = 0;
    Record r = fetch(id, &record_bytes);
    if (r.model != model_) throw another_model(id, r.model, model_);
    std::lock_guard<std::mutex> lock(mu_);
    if (!entries_.count(id)) make_room(0);
    Entry& e = entries_[id];
    st_.memory_bytes -= e.bytes ? e.bytes->size() : 0;
    st_.store_bytes -= e.record_bytes;
    e.info = r.info;
    e.info.busy = true;
    e.model = r.model;
    e.bytes = r.state.bytes;
    e.unfed_token = r.state.unfed_token;
    e.record_bytes = record_bytes;
    e.used = ++clock_;
    st_.memory_bytes += r.info.bytes;
    st_.store_bytes += e.record_bytes;
    ++st_.loads;
    return Lease(this, id, State{e.bytes, e.unfed_token, e.info.position});
  } catch (...) {
    unclaim(id);
    throw;
  }
}

State Sessions::load(Entry& e) {
  State s{e.bytes, e.unfed_token, e.info.position};
  if (s.bytes || !store_ || e.info.position == 0) return s;
  const Record r = fetch(e.info.id);
  if (r.model != model_) throw another_model(e.info.id, r.model, model_);
  std::lock_guard<std::mutex> lock(mu_);
  ++st_.loads;
  e.bytes = r.state.bytes;
  e.info.bytes = e.bytes ? e.bytes->size() : 0;
  st_.memory_bytes += e.info.bytes;
  trim_memory();
  return {e.bytes, r.state.unfed_token, r.state.position};
}

// Called with the entry busy (ours) and mu_ free: the store's write is the slow part. The record
// replaces the version this server read; one another server wrote meanwhile is kept (409).
void Sessions::save(const std::string& id, const State& s, Info& info) {
  const uint64_t expected = info.version;
  info.version = expected + 1;
  info.updated = unix_now();
  info.position = s.position;
  info.bytes = s.bytes ? s.bytes->size() : 0;
  std::string record;
  if (store_) {
    record = encode_record(info, model_, s);
    {
      std::lock_guard<std::mutex> lock(mu_);
      make_room(record.size());
    }
    if (!guard([&] { return store_->put(id, record, expected); }))
      throw conflict("session '" + id + "' was written by another server during this turn; " +
                     "this turn is not stored");
  }
  std::lock_guard<std::mutex> lock(mu_);
  Entry& e = get(id);
  st_.memory_bytes -= e.bytes ? e.bytes->size() : 0;
  st_.store_bytes += record.size() - e.record_bytes;
  e.record_bytes = record.size();
  e.bytes = s.bytes;
  st_.memory_bytes += info.bytes;
  e.unfed_token = s.unfed_token;
  e.info.position = info.position;
  e.info.bytes = info.bytes;
  e.info.updated = info.updated;
  e.info.version = info.version;
  e.used = ++clock_;
  if (store_) ++st_.saves;
  trim_memory();
}

void Sessions::release(const std::string& id) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(id);
    if (it != entries_.end()) it->second.info.busy = false;
  }
  if (shared()) unclaim(id);
}

void Sessions::unclaim(const std::string& id) {
  try {
    guard([&] { store_->unclaim(id); });
  } catch (const api::ApiError&) {  // counted and reported; the claim lapses by itself
  }
}

// Room for one more session (and `incoming_record` more bytes in the store): the least recently
// used idle sessions go, from memory and from a local store. A shared store keeps them: its
// records expire by themselves, and this server's map is only a cache of it. Called with mu_ held.
void Sessions::make_room(size_t incoming_record) {
  const bool local = store_ && !store_->shared();
  auto over = [&] {
    return entries_.size() >= opts_.max_sessions + (incoming_record ? 1 : 0) ||
           (local && opts_.max_store_bytes &&
            st_.store_bytes + incoming_record > opts_.max_store_bytes);
  };
  while (over()) {
    auto victim = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (!it->second.info.busy && (victim == entries_.end() || it->second.used < victim->second.used))
        victim = it;
    if (victim == entries_.end()) return;  // every session is busy
    if (local) store_->remove(victim->first);
    drop(victim);
    ++st_.evicted;
  }
}

void Sessions::drop(std::map<std::string, Entry>::iterator it) {
  st_.store_bytes -= it->second.record_bytes;
  st_.memory_bytes -= it->second.bytes ? it->second.bytes->size() : 0;
  entries_.erase(it);
}

// States the store holds leave memory, least recently used first, beyond the memory budget.
void Sessions::trim_memory() {
  if (!store_) return;
  while (st_.memory_bytes > opts_.memory_bytes) {
    Entry* victim = nullptr;
    for (auto& [id, e] : entries_)
      if (e.bytes && !e.info.busy && (!victim || e.used < victim->used)) victim = &e;
    if (!victim) return;
    st_.memory_bytes -= victim->bytes->size();
    victim->bytes.reset();
  }
}

Info Sessions::fork(const std::string& from, const std::string& id) {
  Lease src = acquire(from);
  Lease dst = create(id);
  return dst.commit(src.state());
}

Info Sessions::info(const std::string& id) const {
  if (shared()) {  // as the store has it now
    check_id(id);
    Info i = fetch(id).info;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(id);
    i.busy = it != entries_.end() && it->second.info.busy;
    return i;
  }
  std::lock_guard<std::mutex> lock(mu_);
  auto it = entries_.find(id);
  if (it == entries_.end()) throw_missing(id);
  return it->second.info;
}

std::vector<Info> Sessions::list() const {
  std::vector<Info> out;
  if (shared()) {
    for (Record& r : guard([&] { return store_->scan(nullptr); })) out.push_back(r.info);
    std::lock_guard<std::mutex> lock(mu_);
    for (Info& i : out) {
      auto it = entries_.find(i.id);
      i.busy = it != entries_.end() && it->second.info.busy;
    }
    return out;
  }
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [id, e] : entries_) out.push_back(e.info);
  return out;
}

void Sessions::remove(const std::string& id) {
  if (shared()) {
    check_id(id);
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = entries_.find(id);
      if (it != entries_.end() && it->second.info.busy) throw busy(id);
    }
    if (!guard([&] { return store_->claim(id); })) throw busy_elsewhere(id);
    bool stored;
    try {
      stored = guard([&] { return store_->remove(id); });
    } catch (...) {
      unclaim(id);
      throw;
    }
    unclaim(id);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.find(id);
    if (!stored && it == entries_.end()) throw_missing(id);
    if (it != entries_.end() && !it->second.info.busy) drop(it);
    ++st_.removed;
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (get(id).info.busy) throw busy(id);
  if (store_) store_->remove(id);
  drop(entries_.find(id));
  ++st_.removed;
}

Stats Sessions::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s = st_;
  s.sessions = entries_.size();
  for (const auto& [id, e] : entries_) s.busy += e.info.busy;
  s.store_errors = store_errors_;
  s.store_calls = store_calls_;
  s.store_seconds = static_cast<double>(store_nanos_) * 1e-9;
  s.misses = misses_;
  return s;
}

}  // namespace mp::sessions
