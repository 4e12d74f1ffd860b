// crisp-edge's packed int8 weight layout ("vnni16"), shared by crisp::qlinear (qlinear.cpp, which reads it) and
// crisp::fold_quant_ (fold_quant.cpp, which quantizes and writes it at set_task); custom_ops.pack_int8 is its Python
// reference.
// One int8 buffer per (N, K) layer: [codes | scales | sums].
//   codes: (ceil(N / 16), ceil(K / 4), 64) int8; block b, input group g holds Wq[16 b + j, 4 g + t] at 4 j + t,
//          zero past N or K (a multiple of 64 bytes: what follows stays aligned)
//   scales: N float32, per output channel (W ~ scales[o] * Wq[o, :]); sums: N int32, sum_k Wq[o, k]
#pragma once
#include <cstdint>

namespace crisp_q {

constexpr int64_t kBlock = 16;  // outputs per packed block (one AVX-512 vector of int32 sums)
constexpr int64_t kGroup = 4;   // input channels per packed group (vpdpbusd's 4 products per lane)

inline int64_t codes_bytes(int64_t n, int64_t k) {
  return (n + kBlock - 1) / kBlock * ((k + kGroup - 1) / kGroup) * kBlock * kGroup;
}
inline int64_t buffer_bytes(int64_t n, int64_t k) { return codes_bytes(n, k) + 8 * n; }

}  // namespace crisp_q
