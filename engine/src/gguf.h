// GGUF v3 reading (bounds-checked, over an mmap-ed file) and writing.
// Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "multipole/multipole.h"

namespace mp::gguf {

enum class ValueType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

struct Value {
  ValueType type = ValueType::U32;
  uint64_t u = 0;                  // unsigned ints and bool
  int64_t i = 0;                   // signed ints
  double f = 0;                    // floats
  std::string s;                   // STRING, and the raw bytes of a U8/I8 array
  ValueType elem = ValueType::U8;  // ARRAY element type
  std::vector<Value> arr;          // ARRAY of anything but U8/I8

  static Value str(std::string v);
  static Value u32(uint32_t v);
  static Value i32(int32_t v);
  static Value f32(float v);
  static Value boolean(bool v);
  static Value bytes(std::string v);  // ARRAY of U8
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> shape;  // outermost first (GGUF stores innermost first)
  DType dtype = DType::F32;
  uint64_t offset = 0;  // from the start of the file
  uint64_t nbytes = 0;
};

struct File {
  uint32_t version = 0;
  std::map<std::string, Value> kv;
  std::vector<TensorInfo> tensors;
  uint64_t data_offset = 0;

  // Typed getters; throw Error naming the key when absent or of the wrong type.
  const Value& get(const std::string& key) const;
  const Value* find(const std::string& key) const;
  uint64_t get_uint(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
};

// Parses the header of a GGUF image of `size` bytes. Every read is bounds-checked; every tensor
// must lie inside the image. Throws Error with the offset and item at fault.
File parse(const uint8_t* data, size_t size);

struct TensorOut {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype;
  // Appends the tensor's bytes (dtype_bytes(dtype, numel)) to `out`.
  std::function<void(std::vector<uint8_t>& out)> write;
};

// Writes a GGUF v3 file (alignment 32) crash-safely (file_io.h): `path` is the old file or the
// whole new one. `progress` is called after each tensor.
void write(const std::string& path, const std::map<std::string, Value>& kv,
           const std::vector<TensorOut>& tensors,
           const std::function<void(size_t, size_t, const std::string&)>& progress = {});

}  // namespace mp::gguf
