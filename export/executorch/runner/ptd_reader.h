// A strict, bounds-checked reader of ExecuTorch FlatTensor (.ptd) bytes (flat_tensor.fbs), and the
// crisp.digest of a task file. Untrusted task files never reach ExecuTorch's own FlatTensorDataMap:
// this reader checks every offset, length and alignment before it reads, and gives the same answer
// as crisp_edge's Python reader (export/executorch/tasks.py parse_ptd), check for check.
//
// crisp.digest (uint8 [32]) = SHA-256 of the canonical form of every other tensor of the file
// (crisp.tag included), defined in export/executorch/digest.py and the runner README:
//   "crisp-edge/ptd-digest/v1\n"
//   u32 tensor count
//   per tensor, by name in bytewise order:
//     u32 name length, name (UTF-8), u8 dtype code (ExecuTorch ScalarType: 0 uint8, 4 int64, 6 float32),
//     u8 rank, rank x i64 dims, u64 byte count, the bytes (C order)
//   all integers little-endian.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "sha256.h"

namespace crisp {

struct PtdError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct PtdTensor {
  std::string name;
  int dtype = 0;  // ExecuTorch ScalarType code
  std::vector<int64_t> sizes;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  int64_t numel() const {
    int64_t n = 1;
    for (auto d : sizes) n *= d;
    return n;
  }
};

constexpr int kByte = 0, kLong = 4, kFloat = 6;
constexpr const char* kTagKey = "crisp.tag";
constexpr const char* kDigestKey = "crisp.digest";
constexpr const char* kMixersKey = "crisp.mixers";  // every mixer group of a task, by name
constexpr const char* kDigestDomain = "crisp-edge/ptd-digest/v1\n";

inline int dtype_size(int code) {
  switch (code) {
    case kByte: return 1;
    case kLong: return 8;
    case kFloat: return 4;
    default: return 0;
  }
}

class PtdReader {
 public:
  PtdReader(const uint8_t* data, size_t n) : d_(data), n_(n) {}

  // Every tensor of the file, in file order (pointing into the caller's bytes).
  std::vector<PtdTensor> tensors() {
    if (n_ < 48 || std::memcmp(d_ + 4, "FT01", 4) != 0)
      throw PtdError("not an ExecuTorch .ptd file (no FT01 FlatTensor identifier; " + std::to_string(n_) + " bytes)");
    if (std::memcmp(d_ + 8, "FH01", 4) != 0) bad("no FH01 extended header at byte 8");
    uint32_t length = rd<uint32_t>(12);
    uint64_t fb_off = rd<uint64_t>(16), fb_size = rd<uint64_t>(24), seg_base = rd<uint64_t>(32),
             seg_size = rd<uint64_t>(40);
    if (length < 40 || fb_off > n_ || fb_size > n_ - fb_off || seg_base > n_ || seg_size > n_ - seg_base ||
        seg_base < fb_off + fb_size)
      bad("the header's offsets (flatbuffer " + std::to_string(fb_off) + "+" + std::to_string(fb_size) +
          ", segments " + std::to_string(seg_base) + "+" + std::to_string(seg_size) + ") do not fit the file's " +
          std::to_string(n_) + " bytes");
    std::vector<size_t> root = table(follow(0, "root table"), "FlatTensor", 3);
    if (root[0] && u32(root[0], "version") > 0) bad("FlatTensor version newer than this reader (0)");
    if (!root[1] || !root[2]) bad("it has no segment list or no named data");
    std::vector<std::pair<uint64_t, uint64_t>> segments;
    size_t start, count;
    vector(root[1], 4, "segment list", &start, &count);
    for (size_t i = 0; i < count; ++i) {
      std::string what = "segment " + std::to_string(i);
      auto f = table(follow(start + 4 * i, what), what, 2);
      uint64_t off = f[0] ? u64(f[0], what + " offset") : 0, size = f[1] ? u64(f[1], what + " size") : 0;
      if (off > seg_size || size > seg_size - off)
        bad(what + " (" + std::to_string(off) + "+" + std::to_string(size) + ") lies outside the segment data (" +
            std::to_string(seg_size) + " bytes)");
      segments.emplace_back(seg_base + off, size);
    }
    std::vector<PtdTensor> out;
    vector(root[2], 4, "named data list", &start, &count);
    for (size_t i = 0; i < count; ++i) {
      std::string what = "tensor " + std::to_string(i);
      auto f = table(follow(start + 4 * i, what), what, 3);
      if (!f[0] || !f[2]) bad(what + " has no key or no tensor layout");
      PtdTensor t;
      t.name = string(f[0], what + " key");
      what = "tensor '" + t.name + "'";
      for (const auto& o : out)
        if (o.name == t.name) bad(what + " appears twice");
      uint32_t seg = f[1] ? u32(f[1], what + " segment index") : 0;
      if (seg >= segments.size())
        bad(what + " names segment " + std::to_string(seg) + "; the file has " + std::to_string(segments.size()));
      auto l = table(follow(f[2], what + " layout"), what + " layout", 3);
      t.dtype = l[0] ? byte(l[0], what + " dtype") : 0;
      if (!dtype_size(t.dtype))
        bad(what + " has dtype code " + std::to_string(t.dtype) + "; task files hold float32, int64 and uint8 tensors only");
      if (l[1]) {
        size_t s0, rank;
        vector(l[1], 4, what + " sizes", &s0, &rank);
        if (rank > 8) bad(what + " has " + std::to_string(rank) + " dimensions");
        for (size_t k = 0; k < rank; ++k) {
          int32_t v = static_cast<int32_t>(rd<uint32_t>(s0 + 4 * k));
          if (v < 0) bad(what + " has a negative size");
          t.sizes.push_back(v);
        }
      }
      size_t o0 = 0, on = 0;
      if (l[2]) vector(l[2], 1, what + " dim order", &o0, &on);
      bool identity = on == t.sizes.size();
      for (size_t k = 0; identity && k < on; ++k) identity = d_[o0 + k] == k;
      if (!identity) bad(what + " has a dim order other than the identity; expected a contiguous tensor");
      uint64_t numel = 1;
      for (auto s : t.sizes) {
        if (s && numel > (uint64_t(1) << 40) / uint64_t(s)) bad(what + " has more elements than any task holds");
        numel *= uint64_t(s);
      }
      auto [pos, size] = segments[seg];
      if (numel * dtype_size(t.dtype) != size)
        bad(what + " has " + std::to_string(numel) + " elements but its segment holds " + std::to_string(size) + " bytes");
      t.data = d_ + pos;
      t.nbytes = size;
      out.push_back(std::move(t));
    }
    return out;
  }

 private:
  [[noreturn]] void bad(const std::string& why) const { throw PtdError("a damaged or truncated .ptd file (" + why + ")"); }

  template <typename T>
  T rd(size_t pos) const {  // little-endian, bounds checked by the caller or here
    if (pos > n_ || sizeof(T) > n_ - pos) bad("a read at byte " + std::to_string(pos) + " lies outside the file");
    T v = 0;
    for (size_t k = 0; k < sizeof(T); ++k) v |= T(d_[pos + k]) << (8 * k);
    return v;
  }
  void at(size_t pos, size_t size, const std::string& what) const {
    if (pos > n_ || size > n_ - pos)
      bad(what + " at byte " + std::to_string(pos) + " lies outside the file (" + std::to_string(n_) + " bytes)");
    if (pos % size) bad(what + " at byte " + std::to_string(pos) + " is not " + std::to_string(size) + "-byte aligned");
  }
  uint32_t u32(size_t pos, const std::string& what) const { at(pos, 4, what); return rd<uint32_t>(pos); }
  uint64_t u64(size_t pos, const std::string& what) const { at(pos, 8, what); return rd<uint64_t>(pos); }
  uint16_t u16(size_t pos, const std::string& what) const { at(pos, 2, what); return rd<uint16_t>(pos); }
  int byte(size_t pos, const std::string& what) const {
    if (pos >= n_) bad(what + " lies outside the file");
    return static_cast<int8_t>(d_[pos]);
  }
  size_t follow(size_t pos, const std::string& what) const {
    uint32_t off = u32(pos, what);
    if (off == 0 || off >= (1u << 31) || pos + off >= n_)
      bad(what + ": offset " + std::to_string(off) + " at byte " + std::to_string(pos) + " points outside the file");
    return pos + off;
  }
  std::vector<size_t> table(size_t pos, const std::string& what, int nfields) const {
    int64_t vt = int64_t(pos) - int64_t(static_cast<int32_t>(u32(pos, what)));
    if (vt < 0 || size_t(vt) >= n_) bad(what + ": vtable outside the file");
    uint16_t vt_size = u16(vt, what + " vtable"), tbl_size = u16(vt + 2, what + " vtable");
    if (vt_size < 4 || vt_size % 2 || size_t(vt) + vt_size > n_) bad(what + ": malformed vtable");
    if (tbl_size < 4 || pos + tbl_size > n_) bad(what + ": table runs past the end of the file");
    std::vector<size_t> fields;
    for (int i = 0; i < nfields; ++i) {
      int slot = 4 + 2 * i;
      uint16_t fo = slot < vt_size ? u16(vt + slot, what + " vtable") : 0;
      if (fo && (fo < 4 || fo + 4 > tbl_size)) bad(what + ": a field lies outside its table");
      fields.push_back(fo ? pos + fo : 0);
    }
    return fields;
  }
  void vector(size_t pos, size_t elem, const std::string& what, size_t* start, size_t* count) const {
    size_t v = follow(pos, what);
    uint32_t c = u32(v, what + " length");
    *start = v + 4;
    if (*start > n_ || uint64_t(c) * elem > n_ - *start) bad(what + ": elements run past the end of the file");
    if (elem > 1 && *start % elem) bad(what + ": elements are not aligned");
    *count = c;
  }
  std::string string(size_t pos, const std::string& what) const {
    size_t start, count;
    vector(pos, 1, what, &start, &count);
    if (start + count >= n_ || d_[start + count] != 0) bad(what + ": string is not NUL-terminated inside the file");
    if (count > 256) bad(what + ": longer than 256 bytes");
    return std::string(reinterpret_cast<const char*>(d_ + start), count);
  }

  const uint8_t* d_;
  size_t n_;
};

// The crisp.digest of `tensors`: SHA-256 over the canonical form of every tensor but crisp.digest.
inline void ptd_digest(const std::vector<PtdTensor>& tensors, uint8_t out[32]) {
  std::vector<const PtdTensor*> order;
  for (const auto& t : tensors)
    if (t.name != kDigestKey) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const PtdTensor* a, const PtdTensor* b) { return a->name < b->name; });
  Sha256 h;
  auto le = [&h](uint64_t v, int bytes) {
    uint8_t b[8];
    for (int k = 0; k < bytes; ++k) b[k] = uint8_t(v >> (8 * k));
    h.update(b, bytes);
  };
  h.update(kDigestDomain, std::strlen(kDigestDomain));
  le(order.size(), 4);
  for (const PtdTensor* t : order) {
    le(t->name.size(), 4);
    h.update(t->name.data(), t->name.size());
    le(uint8_t(t->dtype), 1);
    le(t->sizes.size(), 1);
    for (auto s : t->sizes) le(uint64_t(s), 8);
    le(t->nbytes, 8);
    h.update(t->data, t->nbytes);
  }
  h.finish(out);
}

}  // namespace crisp
