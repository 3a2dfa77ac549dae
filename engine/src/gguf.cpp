#include "gguf.h"

#include <cstring>
#include <limits>
#include <set>

#include "file_io.h"
#include "numeric.h"

namespace mp::gguf {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kAlignment = 32;
constexpr uint32_t kMaxDims = 4;

uint32_t ggml_type(DType t) {
  switch (t) {
    case DType::F32:
      return 0;
    case DType::F16:
      return 1;
    case DType::BF16:
      return 30;
    case DType::Q8_0:
      return 8;
  }
  return 0;
}

class Cursor {
 public:
  Cursor(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  size_t pos() const { return pos_; }
  void need(size_t k, const char* what) const {
    if (k > n_ - pos_)
      throw Error("GGUF: file truncated while reading " + std::string(what) + " at offset " +
                  std::to_string(pos_) + " (needs " + std::to_string(k) + " bytes, " +
                  std::to_string(n_ - pos_) + " left)");
  }
  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, d_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(const char* what) {
    const uint64_t len = read<uint64_t>(what);
    if (len > n_ - pos_)
      throw Error("GGUF: string length " + std::to_string(len) + " of " + what + " at offset " +
                  std::to_string(pos_ - 8) + " runs past the end of the file");
    std::string s(reinterpret_cast<const char*>(d_ + pos_), len);
    pos_ += len;
    return s;
  }

 private:
  const uint8_t* d_;
  size_t n_;
  size_t pos_ = 0;
};

Value read_value(Cursor& c, ValueType t, const std::string& key, int depth) {
  Value v;
  v.type = t;
  const char* what = "metadata value";
  switch (t) {
    case ValueType::U8:
      v.u = c.read<uint8_t>(what);
      break;
    case ValueType::I8:
      v.i = c.read<int8_t>(what);
      break;
    case ValueType::U16:
      v.u = c.read<uint16_t>(what);
      break;
    case ValueType::I16:
      v.i = c.read<int16_t>(what);
      break;
    case ValueType::U32:
      v.u = c.read<uint32_t>(what);
      break;
    case ValueType::I32:
      v.i = c.read<int32_t>(what);
      break;
    case ValueType::U64:
      v.u = c.read<uint64_t>(what);
      break;
    case ValueType::I64:
      v.i = c.read<int64_t>(what);
      break;
    case ValueType::F32:
      v.f = c.read<float>(what);
      break;
    case ValueType::F64:
      v.f = c.read<double>(what);
      break;
    case ValueType::BOOL: {
      const uint8_t b = c.read<uint8_t>(what);
      if (b > 1) throw Error("GGUF: key '" + key + "' has bool value " + std::to_string(b));
      v.u = b;
      break;
    }
    case ValueType::STRING:
      v.s = c.str(what);
      break;
    case ValueType::ARRAY: {
      if (depth > 2) throw Error("GGUF: key '" + key + "' nests arrays too deeply");
      const uint32_t et = c.read<uint32_t>("array type");
      if (et > 12)
        throw Error("GGUF: key '" + key + "' has unknown array type " + std::to_string(et));
      v.elem = static_cast<ValueType>(et);
      const uint64_t n = c.read<uint64_t>("array length");
      if (v.elem == ValueType::U8 || v.elem == ValueType::I8) {
        c.need(n, "byte array");
        for (uint64_t k = 0; k < n; ++k) v.s.push_back(static_cast<char>(c.read<uint8_t>("byte")));
      } else {
        // Every element takes at least one byte: a length past the file is corrupt.
        c.need(std::min<uint64_t>(n, std::numeric_limits<size_t>::max()), "array");
        v.arr.reserve(n);
        for (uint64_t k = 0; k < n; ++k) v.arr.push_back(read_value(c, v.elem, key, depth + 1));
      }
      break;
    }
    default:
      throw Error("GGUF: key '" + key + "' has unknown value type " +
                  std::to_string(static_cast<uint32_t>(t)) + " at offset " +
                  std::to_string(c.pos() - 4));
  }
  return v;
}

void write_value(std::vector<uint8_t>& out, const Value& v, bool with_type);

template <class T>
void put(std::vector<uint8_t>& out, T v) {
  const size_t at = out.size();
  out.resize(at + sizeof(T));
  std::memcpy(out.data() + at, &v, sizeof(T));
}
void put_str(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  const size_t at = out.size();
  out.resize(at + s.size());
  if (!s.empty()) std::memcpy(out.data() + at, s.data(), s.size());
}

void write_value(std::vector<uint8_t>& out, const Value& v, bool with_type) {
  if (with_type) put<uint32_t>(out, static_cast<uint32_t>(v.type));
  switch (v.type) {
    case ValueType::U8:
      put<uint8_t>(out, v.u);
      break;
    case ValueType::I8:
      put<int8_t>(out, v.i);
      break;
    case ValueType::U16:
      put<uint16_t>(out, v.u);
      break;
    case ValueType::I16:
      put<int16_t>(out, v.i);
      break;
    case ValueType::U32:
      put<uint32_t>(out, v.u);
      break;
    case ValueType::I32:
      put<int32_t>(out, v.i);
      break;
    case ValueType::U64:
      put<uint64_t>(out, v.u);
      break;
    case ValueType::I64:
      put<int64_t>(out, v.i);
      break;
    case ValueType::F32:
      put<float>(out, static_cast<float>(v.f));
      break;
    case ValueType::F64:
      put<double>(out, v.f);
      break;
    case ValueType::BOOL:
      put<uint8_t>(out, v.u ? 1 : 0);
      break;
    case ValueType::STRING:
      put_str(out, v.s);
      break;
    case ValueType::ARRAY:
      put<uint32_t>(out, static_cast<uint32_t>(v.elem));
      if (v.elem == ValueType::U8 || v.elem == ValueType::I8) {
        put_str(out, v.s);
      } else {
        put<uint64_t>(out, v.arr.size());
        for (const auto& e : v.arr) write_value(out, e, false);
      }
      break;
  }
}

}  // namespace

Value Value::str(std::string v) {
  Value r;
  r.type = ValueType::STRING;
  r.s = std::move(v);
  return r;
}
Value Value::u32(uint32_t v) {
  Value r;
  r.type = ValueType::U32;
  r.u = v;
  return r;
}
Value Value::i32(int32_t v) {
  Value r;
  r.type = ValueType::I32;
  r.i = v;
  return r;
}
Value Value::f32(float v) {
  Value r;
  r.type = ValueType::F32;
  r.f = v;
  return r;
}
Value Value::boolean(bool v) {
  Value r;
  r.type = ValueType::BOOL;
  r.u = v;
  return r;
}
Value Value::bytes(std::string v) {
  Value r;
  r.type = ValueType::ARRAY;
  r.elem = ValueType::U8;
  r.s = std::move(v);
  return r;
}

const Value* File::find(const std::string& key) const {
  auto it = kv.find(key);
  return it == kv.end() ? nullptr : &it->second;
}
const Value& File::get(const std::string& key) const {
  const Value* v = find(key);
  if (!v) throw Error("GGUF: missing metadata key '" + key + "'");
  return *v;
}
uint64_t File::get_uint(const std::string& key) const {
  const Value& v = get(key);
  switch (v.type) {
    case ValueType::U8:
    case ValueType::U16:
    case ValueType::U32:
    case ValueType::U64:
      return v.u;
    case ValueType::I8:
    case ValueType::I16:
    case ValueType::I32:
    case ValueType::I64:
      if (v.i >= 0) return static_cast<uint64_t>(v.i);
      throw Error("GGUF: metadata key '" + key + "' is negative");
    default:
      throw Error("GGUF: metadata key '" + key + "' is not an integer");
  }
}
double File::get_float(const std::string& key) const {
  const Value& v = get(key);
  if (v.type != ValueType::F32 && v.type != ValueType::F64)
    throw Error("GGUF: metadata key '" + key + "' is not a float");
  return v.f;
}
bool File::get_bool(const std::string& key) const {
  const Value& v = get(key);
  if (v.type != ValueType::BOOL) throw Error("GGUF: metadata key '" + key + "' is not a bool");
  return v.u != 0;
}
const std::string& File::get_string(const std::string& key) const {
  const Value& v = get(key);
  if (v.type != ValueType::STRING && !(v.type == ValueType::ARRAY && v.elem == ValueType::U8))
    throw Error("GGUF: metadata key '" + key + "' is not a string");
  return v.s;
}

File parse(const uint8_t* data, size_t size) {
  Cursor c(data, size);
  File f;
  if (size < 4 || c.read<uint32_t>("magic") != kMagic)
    throw Error("GGUF: not a GGUF file (bad magic at offset 0)");
  f.version = c.read<uint32_t>("version");
  if (f.version != 3)
    throw Error("GGUF: unsupported version " + std::to_string(f.version) + " (expected 3)");
  const uint64_t n_tensors = c.read<uint64_t>("tensor count");
  const uint64_t n_kv = c.read<uint64_t>("metadata count");
  // Each entry takes at least 8 bytes: counts beyond that are corrupt, not allocations to try.
  if (n_tensors > size / 8 || n_kv > size / 8)
    throw Error("GGUF: file truncated or corrupt: implausible counts (" +
                std::to_string(n_tensors) + " tensors, " + std::to_string(n_kv) +
                " metadata keys) for a file of " + std::to_string(size) + " bytes");
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = c.str("metadata key");
    const uint32_t t = c.read<uint32_t>("metadata type");
    if (t > 12) throw Error("GGUF: key '" + key + "' has unknown value type " + std::to_string(t));
    Value v = read_value(c, static_cast<ValueType>(t), key, 0);
    if (!f.kv.emplace(key, std::move(v)).second)
      throw Error("GGUF: duplicate metadata key '" + key + "'");
  }
  uint64_t alignment = kAlignment;
  if (const Value* a = f.find("general.alignment")) {
    alignment = a->u;
    if (alignment == 0 || (alignment & (alignment - 1)) != 0)
      throw Error("GGUF: general.alignment " + std::to_string(alignment) + " is not a power of 2");
  }
  std::set<std::string> names;
  std::vector<uint64_t> rel_offsets;
  for (uint64_t k = 0; k < n_tensors; ++k) {
    TensorInfo t;
    t.name = c.str("tensor name");
    const uint32_t nd = c.read<uint32_t>("tensor dims");
    if (nd == 0 || nd > kMaxDims)
      throw Error("GGUF: tensor '" + t.name + "' has " + std::to_string(nd) + " dimensions");
    std::vector<int64_t> ne(nd);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t n = c.read<uint64_t>("tensor dim");
      if (n == 0 || n > (uint64_t{1} << 40) || numel > (uint64_t{1} << 40) / n)
        throw Error("GGUF: tensor '" + t.name + "' has an implausible dimension " +
                    std::to_string(n));
      numel *= n;
      ne[d] = static_cast<int64_t>(n);
    }
    t.shape.assign(ne.rbegin(), ne.rend());
    const uint32_t type = c.read<uint32_t>("tensor type");
    if (type == 0)
      t.dtype = DType::F32;
    else if (type == 1)
      t.dtype = DType::F16;
    else if (type == 30)
      t.dtype = DType::BF16;
    else if (type == 8)
      t.dtype = DType::Q8_0;
    else
      throw Error("GGUF: tensor '" + t.name + "' has unsupported type " + std::to_string(type) +
                  " (F32, F16, BF16 and Q8_0 are supported)");
    if (t.dtype == DType::Q8_0 && ne[0] % kQ8Block != 0)
      throw Error("GGUF: Q8_0 tensor '" + t.name + "' has rows of " + std::to_string(ne[0]) +
                  " elements, not a multiple of the block size " + std::to_string(kQ8Block));
    const uint64_t off = c.read<uint64_t>("tensor offset");
    if (off % alignment != 0)
      throw Error("GGUF: tensor '" + t.name + "' offset " + std::to_string(off) +
                  " is not aligned");
    t.nbytes = dtype_bytes(t.dtype, int64_t(numel));
    rel_offsets.push_back(off);
    if (!names.insert(t.name).second) throw Error("GGUF: duplicate tensor '" + t.name + "'");
    f.tensors.push_back(std::move(t));
  }
  f.data_offset = (c.pos() + alignment - 1) / alignment * alignment;
  for (size_t k = 0; k < f.tensors.size(); ++k) {
    TensorInfo& t = f.tensors[k];
    // Compared before adding: a huge offset (or alignment) must not wrap around into the file.
    if (f.data_offset > size || rel_offsets[k] > size - f.data_offset ||
        t.nbytes > size - f.data_offset - rel_offsets[k])
      throw Error("GGUF: tensor '" + t.name + "' (" + std::to_string(t.nbytes) +
                  " bytes at offset " + std::to_string(rel_offsets[k]) + " of the data section at " +
                  std::to_string(f.data_offset) + ") runs past the end of the " +
                  std::to_string(size) + "-byte file: the file is truncated");
    t.offset = f.data_offset + rel_offsets[k];
  }
  return f;
}

void write(const std::string& path, const std::map<std::string, Value>& kv,
           const std::vector<TensorOut>& tensors,
           const std::function<void(size_t, size_t, const std::string&)>& progress) {
  std::vector<uint8_t> head;
  put<uint32_t>(head, kMagic);
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors.size());
  put<uint64_t>(head, kv.size() + (kv.count("general.alignment") ? 0 : 1));
  for (const auto& [k, v] : kv) {
    put_str(head, k);
    write_value(head, v, true);
  }
  if (!kv.count("general.alignment")) {
    put_str(head, "general.alignment");
    write_value(head, Value::u32(kAlignment), true);
  }
  uint64_t off = 0;
  for (const auto& t : tensors) {
    put_str(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.shape.size()));
    uint64_t numel = 1;
    for (auto it = t.shape.rbegin(); it != t.shape.rend(); ++it) {
      put<uint64_t>(head, static_cast<uint64_t>(*it));
      numel *= static_cast<uint64_t>(*it);
    }
    if (t.dtype == DType::Q8_0 && t.shape.back() % kQ8Block != 0)
      throw Error("GGUF write: Q8_0 tensor '" + t.name + "' has rows of " +
                  std::to_string(t.shape.back()) + " elements, not whole blocks of " +
                  std::to_string(kQ8Block));
    put<uint32_t>(head, ggml_type(t.dtype));
    put<uint64_t>(head, off);
    off += (dtype_bytes(t.dtype, int64_t(numel)) + kAlignment - 1) / kAlignment * kAlignment;
  }
  head.resize((head.size() + kAlignment - 1) / kAlignment * kAlignment, 0);

  AtomicFile out(path);
  out.write(head.data(), head.size());
  std::vector<uint8_t> buf;
  for (size_t k = 0; k < tensors.size(); ++k) {
    buf.clear();
    tensors[k].write(buf);
    uint64_t numel = 1;
    for (auto d : tensors[k].shape) numel *= static_cast<uint64_t>(d);
    const size_t want = dtype_bytes(tensors[k].dtype, int64_t(numel));
    if (buf.size() != want)
      throw Error("GGUF write: tensor '" + tensors[k].name + "' produced " +
                  std::to_string(buf.size()) + " bytes, its shape needs " + std::to_string(want));
    buf.resize((buf.size() + kAlignment - 1) / kAlignment * kAlignment, 0);
    out.write(buf.data(), buf.size());
    if (progress) progress(k + 1, tensors.size(), tensors[k].name);
  }
  out.commit();
}

}  // namespace mp::gguf
