// Reading a whole file through a read-only mapping (MappedFile), and crash-safe writing of a
// file in pieces (write_file_atomic, in multipole.h, writes one buffer):
// the bytes go to a temporary file beside the target, are fsynced, and the temporary is renamed
// over the target, then the folder is fsynced. Whenever the writer dies, the target is the old
// file or the new one, never a mix; at worst a `<target>.tmp-XXXXXXXX` file is left behind,
// which nothing reads and the next write into the folder removes. Writers hold a shared lock
// (flock) on the folder while they write; a write that gets it exclusively first knows that no
// temporary there is being written and removes them all (a killed writer's lock is gone).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace mp {

// A whole regular file mapped read-only, unmapped when destroyed (also when the reader that
// holds it throws half-way: a constructor that mapped, then threw, leaked its mapping once).
// `what` names the file in errors ("model 'x'"); a file shorter than `min_size` bytes is refused
// as too short to be `format` (truncated?).
class MappedFile {
 public:
  MappedFile(const std::string& path, const std::string& what, size_t min_size,
             const std::string& format);  // throws Error
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  size_t size() const { return size_; }

 private:
  void* addr_;
  size_t size_ = 0;
};

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);  // creates the temporary; throws Error
  ~AtomicFile();                          // not committed: the temporary is removed
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  void write(const void* data, size_t n);
  void commit();  // fsync, rename over the target, fsync the folder

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  int dir_fd_ = -1;  // the folder, locked shared while the temporary exists
};

}  // namespace mp
