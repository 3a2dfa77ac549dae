// Crash-safe writing of a file in pieces (write_file_atomic, in multipole.h, writes one buffer):
// the bytes go to a temporary file beside the target, are fsynced, and the temporary is renamed
// over the target, then the folder is fsynced. Whenever the writer dies, the target is the old
// file or the new one, never a mix; at worst a `<target>.tmp-XXXXXXXX` file is left behind,
// which nothing reads and the next write into the folder removes. Writers hold a shared lock
// (flock) on the folder while they write; a write that gets it exclusively first knows that no
// temporary there is being written and removes them all (a killed writer's lock is gone).
#pragma once

#include <cstddef>
#include <string>

namespace mp {

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
