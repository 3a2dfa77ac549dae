#include "file_io.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "multipole/multipole.h"

namespace mp {

MappedFile::MappedFile(const std::string& path, const std::string& what, size_t min_size,
                       const std::string& format)
    : addr_(MAP_FAILED) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error("cannot open " + what + ": " + std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(what + " is not a regular file");
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < min_size) {
    ::close(fd);
    throw Error(what + ": file of " + std::to_string(size_) + " bytes is too short to be " +
                format + " (truncated?)");
  }
  addr_ = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (addr_ == MAP_FAILED) throw Error("cannot mmap " + what + ": " + std::strerror(errno));
}

MappedFile::~MappedFile() {
  if (addr_ != MAP_FAILED) munmap(addr_, size_);
}

namespace {
Error io_error(const std::string& what, const std::string& path) {
  return Error(what + " '" + path + "': " + std::strerror(errno));
}

std::string folder_of(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}

// A name AtomicFile gives its temporaries: "<target>.tmp-" and 8 hex digits.
bool is_temporary_name(const std::string& name) {
  constexpr size_t kSuffix = 13;  // ".tmp-XXXXXXXX"
  if (name.size() <= kSuffix || name.compare(name.size() - kSuffix, 5, ".tmp-") != 0) return false;
  return std::all_of(name.end() - 8, name.end(), [](char c) { return std::isxdigit(c); });
}

// Removes the temporaries of writers that died; the caller holds the folder's exclusive lock.
void remove_stray_temporaries(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (is_temporary_name(e.path().filename().string()) && e.is_regular_file(ec))
      std::filesystem::remove(e.path(), ec);  // best effort: a stray left is harmless
}
}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  const std::string dir = folder_of(path_);
  dir_fd_ = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd_ < 0) throw io_error("cannot open the folder", dir);
  if (::flock(dir_fd_, LOCK_EX | LOCK_NB) == 0) remove_stray_temporaries(dir);
  // Shared from here on (from exclusive: other writers may go on). A folder that cannot be
  // locked (some network file systems) is written all the same, and never cleaned.
  while (::flock(dir_fd_, LOCK_SH) != 0 && errno == EINTR) {
  }
  std::random_device rd;
  for (int attempt = 0; fd_ < 0; ++attempt) {
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp-%08x", static_cast<unsigned>(rd()));
    tmp_ = path_ + suffix;
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && (errno != EEXIST || attempt == 16)) {
      const Error e = io_error("cannot create a temporary file for", path_);
      ::close(dir_fd_);
      throw e;
    }
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
  if (dir_fd_ >= 0) ::close(dir_fd_);  // and its lock
}

void AtomicFile::write(const void* data, size_t n) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t k = ::write(fd_, p, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) throw io_error("write failed to", tmp_);
    p += k;
    n -= static_cast<size_t>(k);
  }
}

void AtomicFile::commit() {
  if (::fsync(fd_) != 0) throw io_error("fsync failed on", tmp_);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw io_error("closing failed on", tmp_);
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) throw io_error("cannot rename a temporary file to", path_);
  tmp_.clear();
  // The rename itself is durable once the folder is synced.
  if (::fsync(dir_fd_) != 0) throw io_error("fsync failed on the folder", folder_of(path_));
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace mp
