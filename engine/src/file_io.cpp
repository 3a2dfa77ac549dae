#include "file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "multipole/multipole.h"

namespace mp {
namespace {
Error io_error(const std::string& what, const std::string& path) {
  return Error(what + " '" + path + "': " + std::strerror(errno));
}
}  // namespace

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  std::random_device rd;
  for (int attempt = 0; fd_ < 0; ++attempt) {
    char suffix[32];
    std::snprintf(suffix, sizeof suffix, ".tmp-%08x", static_cast<unsigned>(rd()));
    tmp_ = path_ + suffix;
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && (errno != EEXIST || attempt == 16))
      throw io_error("cannot create a temporary file for", path_);
  }
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!tmp_.empty()) ::unlink(tmp_.c_str());
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
  const std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  const std::string dir = parent.empty() ? std::string(".") : parent.string();
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) throw io_error("cannot open the folder", dir);
  const int rc = ::fsync(dfd);
  ::close(dfd);
  if (rc != 0) throw io_error("fsync failed on the folder", dir);
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFile f(path);
  f.write(bytes.data(), bytes.size());
  f.commit();
}

}  // namespace mp
