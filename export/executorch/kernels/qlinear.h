// crisp-edge's packed int8 weight layout ("vnni16"), shared by crisp::qlinear (qlinear.cpp, which reads it) and
// crisp::fold_quant_ (fold_quant.cpp, which writes it at set_task); custom_ops.pack_int8 is its Python reference.
// One int8 buffer per (N, K) layer: [codes | scales | sums].
//   codes: (ceil(N / 16), ceil(K / 4), 64) int8; block b, input group g holds Wq[16 b + j, 4 g + t] at 4 j + t,
//          zero past N or K (a multiple of 64 bytes: what follows stays aligned)
//   scales: N float32, per output channel (W ~ scales[o] * Wq[o, :]); sums: N int32, sum_k Wq[o, k]
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace crisp_q {

constexpr int64_t kBlock = 16;  // outputs per packed block (one AVX-512 vector of int32 sums)
constexpr int64_t kGroup = 4;   // input channels per packed group (vpdpbusd's 4 products per lane)

inline int64_t codes_bytes(int64_t n, int64_t k) {
  return (n + kBlock - 1) / kBlock * ((k + kGroup - 1) / kGroup) * kBlock * kGroup;
}
inline int64_t buffer_bytes(int64_t n, int64_t k) { return codes_bytes(n, k) + 8 * n; }

// Rows [o0, o0 + rows) of a float (N, K) weight (row-major, w pointing at row o0) quantized symmetric per row
// (scale = max |w| / 127, 1 for a zero row; codes round(w / scale), half to even, in -127..127) into buf (the
// whole layer's buffer). o0 a multiple of kBlock: whole blocks, so no other writer touches them.
inline void quantize_pack_rows(const float* w, int64_t o0, int64_t rows, int64_t n, int64_t k, int8_t* buf) {
  const int64_t groups = (k + kGroup - 1) / kGroup;
  float* scales = reinterpret_cast<float*>(buf + codes_bytes(n, k));
  int32_t* sums = reinterpret_cast<int32_t*>(scales + n);
  for (int64_t q = 0; q < rows; ++q) {
    const int64_t o = o0 + q;
    const float* wr = w + q * k;
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) amax = std::fabs(wr[i]) > amax ? std::fabs(wr[i]) : amax;
    const float scale = amax > 0.f ? amax / 127.f : 1.f;
    int8_t* blk = buf + (o / kBlock) * groups * kBlock * kGroup + (o % kBlock) * kGroup;
    int32_t sum = 0;
    for (int64_t i = 0; i < k; ++i) {
      float c = std::nearbyint(wr[i] / scale);  // division, as the reference: w * (1 / scale) rounds elsewhere
      c = c < -127.f ? -127.f : (c > 127.f ? 127.f : c);
      blk[(i / kGroup) * kBlock * kGroup + i % kGroup] = static_cast<int8_t>(c);
      sum += static_cast<int32_t>(c);
    }
    for (int64_t i = k; i < groups * kGroup; ++i) blk[(i / kGroup) * kBlock * kGroup + i % kGroup] = 0;
    scales[o] = scale;
    sums[o] = sum;
  }
}

}  // namespace crisp_q
