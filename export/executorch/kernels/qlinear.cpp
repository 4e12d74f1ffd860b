// crisp::qlinear.out(x, w, bias?, n, *, out): an int8 linear whose weights are read in
// place from crisp-edge's own packed layout, so a swappable bundle's set_task can rewrite them (XNNPACK packs a
// quantized linear's weights once, at load, and would keep running the load-time task).
//
//   y[r, o] = sx[r] * scales[o] * (sum_k xq[r, k] * Wq[o, k] - zx[r] * sums[o]) + bias[o]
//
// x is quantized per row (per token) at run time to uint8 with a zero point (asymmetric over [min(x, 0),
// max(x, 0)], as XNNPACK's qd8), the weights are int8 per output channel (symmetric, -127..127).
//
// The packed layout ("vnni16", qlinear.h): w is one int8 buffer per layer, [codes | scales | sums]. codes:
// (ceil(N / 16), ceil(K / 4), 64), block b, input group g holding Wq[16 b + j, 4 g + t] at 4 j + t (zero past N
// or K): one 64-byte row per group is the 16 output lanes of one AVX-512 VNNI vpdpbusd (u8 x s8, 4 products per
// int32 lane). scales: N float32; sums: N int32, sum_k Wq[o, k] (the zero-point correction, precomputed when
// the weights are written). One buffer, so set_task writes one tensor per layer (crisp::fold_quant_) and the
// layout is crisp-edge's, not XNNPACK's: whoever writes the weights (fold_quant.cpp, custom_ops.pack_int8) packs.
//
// Paths, chosen at run time: AVX-512 VNNI (gemm_avx512vnni), AVX2 without it (gemm_avx2: exact 16-bit
// multiply-adds, as XNNPACK's AVX2 kernels, at about their speed on ViT-S), portable loops elsewhere (an aarch64
// build's). Every path gives the same integer sums (qlinear_paths.cpp compares them).
#include <cmath>
#include <cstring>
#include <vector>

#include "crisp_kernels.h"
#include "qlinear.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CRISP_X86 1
#endif

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

using crisp_q::kBlock;
using crisp_q::kGroup;
#ifndef MR_MAX
#define MR_MAX 8
#endif
#ifndef NB_MAX
#define NB_MAX 3
#endif

struct QRows {  // x quantized per row: codes (m, kp) uint8, kp = 4 * ceil(k / 4) (padding: the zero point)
  std::vector<uint8_t> codes;
  std::vector<float> scale;
  std::vector<int32_t> zero;
};

// Per-row asymmetric uint8 quantization, as XNNPACK's qd8 (its zero point as uint8 = int8 + 128): over
// [min(x, 0), max(x, 0)], scale = (max - min) / 255, codes round(x / scale) + zero, half to even, clamped.
inline void row_params(float lo, float hi, float& scale, float& inv, int32_t& zero) {
  scale = hi > lo ? (hi - lo) / 255.f : 1.f;
  inv = 1.f / scale;
  const float zf = std::nearbyint(-lo * inv);
  zero = zf < 0.f ? 0 : (zf > 255.f ? 255 : static_cast<int32_t>(zf));
}

void quantize_rows_portable(const float* X, int64_t m, int64_t k, int64_t kp, QRows& q) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = X + r * k;
    float lo = 0.f, hi = 0.f, scale, inv;
    int32_t zero;
    for (int64_t i = 0; i < k; ++i) {
      lo = xr[i] < lo ? xr[i] : lo;
      hi = xr[i] > hi ? xr[i] : hi;
    }
    row_params(lo, hi, scale, inv, zero);
    uint8_t* qr = q.codes.data() + r * kp;
    for (int64_t i = 0; i < k; ++i) {
      float v = std::nearbyint(xr[i] * inv) + static_cast<float>(zero);
      qr[i] = static_cast<uint8_t>(v < 0.f ? 0.f : (v > 255.f ? 255.f : v));
    }
    for (int64_t i = k; i < kp; ++i) qr[i] = static_cast<uint8_t>(zero);  // meets zero weights
    q.scale[r] = scale;
    q.zero[r] = zero;
  }
}

#ifdef CRISP_X86
// The same in AVX-512 (cvtps rounds half to even, as nearbyint in the default rounding mode).
__attribute__((target("avx512f,avx512bw"))) void quantize_rows_avx512(const float* X, int64_t m, int64_t k,
                                                                     int64_t kp, QRows& q) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = X + r * k;
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
      const __m512 v = _mm512_loadu_ps(xr + i);
      vlo = _mm512_min_ps(vlo, v);
      vhi = _mm512_max_ps(vhi, v);
    }
    if (i < k) {
      const __m512 v = _mm512_maskz_loadu_ps(__mmask16((1u << (k - i)) - 1), xr + i);  // zeros: inside [lo, hi]
      vlo = _mm512_min_ps(vlo, v);
      vhi = _mm512_max_ps(vhi, v);
    }
    float scale, inv;
    int32_t zero;
    row_params(_mm512_reduce_min_ps(vlo), _mm512_reduce_max_ps(vhi), scale, inv, zero);
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i vzero = _mm512_set1_epi32(zero), vmax = _mm512_set1_epi32(255);
    uint8_t* qr = q.codes.data() + r * kp;
    for (i = 0; i < kp; i += 16) {
      const __mmask16 mask = k - i >= 16 ? __mmask16(0xFFFF) : (k > i ? __mmask16((1u << (k - i)) - 1) : 0);
      __m512i c = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, xr + i), vinv)), vzero);
      c = _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), vmax);  // padding: 0 * inv + zero
      const int64_t left = kp - i;
      _mm512_mask_cvtepi32_storeu_epi8(qr + i, left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1), c);
    }
    q.scale[r] = scale;
    q.zero[r] = zero;
  }
}
#endif

#ifdef CRISP_X86
// The same quantization in AVX2 (x86-64 CPUs without AVX-512: cvtps rounds half to even, as nearbyint in the
// default rounding mode; the portable loop calls nearbyint once a value where the baseline x86-64 target has no
// rounding instruction).
__attribute__((target("avx2,fma"))) void quantize_rows_avx2(const float* X, int64_t m, int64_t k, int64_t kp,
                                                            QRows& q) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = X + r * k;
    __m256 vlo = _mm256_setzero_ps(), vhi = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      vlo = _mm256_min_ps(vlo, v);
      vhi = _mm256_max_ps(vhi, v);
    }
    float lo_l[8], hi_l[8];
    _mm256_storeu_ps(lo_l, vlo);
    _mm256_storeu_ps(hi_l, vhi);
    float lo = 0.f, hi = 0.f;
    for (int j = 0; j < 8; ++j) {
      lo = lo_l[j] < lo ? lo_l[j] : lo;
      hi = hi_l[j] > hi ? hi_l[j] : hi;
    }
    for (; i < k; ++i) {
      lo = xr[i] < lo ? xr[i] : lo;
      hi = xr[i] > hi ? xr[i] : hi;
    }
    float scale, inv;
    int32_t zero;
    row_params(lo, hi, scale, inv, zero);
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i vzero = _mm256_set1_epi32(zero), vmax = _mm256_set1_epi32(255);
    uint8_t* qr = q.codes.data() + r * kp;
    for (i = 0; i + 8 <= k; i += 8) {
      __m256i c = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv)), vzero);
      c = _mm256_min_epi32(_mm256_max_epi32(c, _mm256_setzero_si256()), vmax);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));  // 0..255 fit
      const __m128i b = _mm_packus_epi16(w, w);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + i), b);
    }
    for (; i < k; ++i) {  // the last values, as the AVX2 lanes compute them
      const __m128 v = _mm_mul_ss(_mm_set_ss(xr[i]), _mm_set_ss(inv));
      int32_t c = _mm_cvtss_si32(v) + zero;
      qr[i] = static_cast<uint8_t>(c < 0 ? 0 : (c > 255 ? 255 : c));
    }
    for (i = k; i < kp; ++i) qr[i] = static_cast<uint8_t>(zero);  // meets zero weights
    q.scale[r] = scale;
    q.zero[r] = zero;
  }
}
#endif

void size_rows(int64_t m, int64_t kp, QRows& q) {
  q.codes.resize(static_cast<size_t>(m * kp));
  q.scale.resize(m);
  q.zero.resize(m);
}

[[maybe_unused]] void quantize_rows_portable_sized(const float* X, int64_t m, int64_t k, int64_t kp, QRows& q) {
  size_rows(m, kp, q);
  quantize_rows_portable(X, m, k, kp, q);
}

void quantize_rows(const float* X, int64_t m, int64_t k, int64_t kp, QRows& q) {
  size_rows(m, kp, q);
#ifdef CRISP_X86
  static const bool avx512 = __builtin_cpu_supports("avx512bw"), avx2 = __builtin_cpu_supports("avx2") &&
                                                                        __builtin_cpu_supports("fma");
  if (avx512) return quantize_rows_avx512(X, m, k, kp, q);
  if (avx2) return quantize_rows_avx2(X, m, k, kp, q);
#endif
  quantize_rows_portable(X, m, k, kp, q);
}

// Portable: any target (the aarch64 runner's build), the same arithmetic in plain loops.
void gemm_portable(const QRows& q, const int8_t* W, const float* ws, const int32_t* wsum, const float* bias,
                   float* Y, int64_t m, int64_t n, int64_t kp) {
  const int64_t groups = kp / kGroup, blocks = (n + kBlock - 1) / kBlock;
  for (int64_t r = 0; r < m; ++r) {
    const uint8_t* xr = q.codes.data() + r * kp;
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t acc[kBlock] = {0};
      const int8_t* wb = W + b * groups * kBlock * kGroup;
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* xg = xr + g * kGroup;
        const int8_t* wg = wb + g * kBlock * kGroup;
        for (int j = 0; j < kBlock; ++j)
          for (int t = 0; t < kGroup; ++t) acc[j] += int32_t(xg[t]) * int32_t(wg[j * kGroup + t]);
      }
      for (int64_t j = 0; j < kBlock && b * kBlock + j < n; ++j) {
        const int64_t o = b * kBlock + j;
        const float v = q.scale[r] * ws[o] * static_cast<float>(acc[j] - q.zero[r] * wsum[o]);
        Y[r * n + o] = bias ? v + bias[o] : v;
      }
    }
  }
}

#ifdef CRISP_X86
// acc += x (u8) . w (s8), four products per int32 lane. In asm: GCC 12's _mm512_dpbusd_epi32 does not tie the
// accumulator to the output register and copies every accumulator on every step (measured: spills at 4 x 4).
__attribute__((target("avx512f,avx512vnni"))) inline void dpbusd(__m512i& acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
}

// AVX-512 VNNI: a tile of MR rows x NB blocks (16 NB outputs) in MR * NB zmm accumulators; per input group,
// NB 64-byte weight loads, MR 4-byte broadcasts of x, MR * NB vpdpbusd.
template <int MR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void tile512(
    const QRows& q, const int8_t* W, const float* ws, const int32_t* wsum, const float* bias, float* Y, int64_t r0,
    int64_t b0, int64_t n, int64_t kp) {
  const int64_t groups = kp / kGroup, bstride = groups * kBlock * kGroup;
  __m512i acc[MR][NB];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 8") for (int c = 0; c < NB; ++c) acc[i][c] = _mm512_setzero_si512();
  const int8_t* wb = W + b0 * bstride;
  const uint8_t* xr = q.codes.data() + r0 * kp;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i w[NB];
    _Pragma("GCC unroll 8") for (int c = 0; c < NB; ++c) w[c] = _mm512_loadu_si512(wb + c * bstride + g * 64);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      int32_t x4;
      std::memcpy(&x4, xr + i * kp + g * kGroup, 4);
      const __m512i xb = _mm512_set1_epi32(x4);
      _Pragma("GCC unroll 8") for (int c = 0; c < NB; ++c) dpbusd(acc[i][c], xb, w[c]);
    }
  }
  _Pragma("GCC unroll 8") for (int c = 0; c < NB; ++c) {
    const int64_t o = (b0 + c) * kBlock;
    const __mmask16 mask = n - o >= kBlock ? __mmask16(0xFFFF) : __mmask16((1u << (n - o)) - 1);
    const __m512i sums = _mm512_maskz_loadu_epi32(mask, wsum + o);
    const __m512 scales = _mm512_maskz_loadu_ps(mask, ws + o);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + o) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512i corr = _mm512_mullo_epi32(sums, _mm512_set1_epi32(q.zero[r0 + i]));
      const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][c], corr));
      const __m512 s = _mm512_mul_ps(scales, _mm512_set1_ps(q.scale[r0 + i]));
      _mm512_mask_storeu_ps(Y + (r0 + i) * n + o, mask, _mm512_fmadd_ps(v, s, b));
    }
  }
}

template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void rows512(const QRows& q, const int8_t* W, const float* ws,
                                                                    const int32_t* wsum, const float* bias, float* Y,
                                                                    int64_t m, int64_t b0, int64_t n, int64_t kp) {
  int64_t r = 0;
  for (; r + MR_MAX <= m; r += MR_MAX) tile512<MR_MAX, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp);
  switch (m - r) {  // the last rows in one pass
    case 7: tile512<7, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    case 6: tile512<6, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    case 5: tile512<5, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    case 4: tile512<4, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    case 3: tile512<3, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    case 2: tile512<2, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    case 1: tile512<1, NB>(q, W, ws, wsum, bias, Y, r, b0, n, kp); break;
    default: break;
  }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void gemm_avx512vnni(
    const QRows& q, const int8_t* W, const float* ws, const int32_t* wsum, const float* bias, float* Y, int64_t m,
    int64_t n, int64_t kp) {
  // Columns outer: a panel of NB_MAX blocks' weights (K * 16 NB_MAX bytes: 18 KB at K = 384) stays in L1 while
  // every row's codes pass over it; the weights leave L2 once per call, not once per row tile.
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  int64_t b = 0;
  for (; b + NB_MAX <= blocks; b += NB_MAX) rows512<NB_MAX>(q, W, ws, wsum, bias, Y, m, b, n, kp);
  switch (blocks - b) {
    case 3: rows512<3>(q, W, ws, wsum, bias, Y, m, b, n, kp); break;
    case 2: rows512<2>(q, W, ws, wsum, bias, Y, m, b, n, kp); break;
    case 1: rows512<1>(q, W, ws, wsum, bias, Y, m, b, n, kp); break;
    default: break;
  }
}
#endif

#ifdef CRISP_X86
// AVX2 without VNNI: exact 16-bit multiply-adds (vpmaddwd, int16 pairs summed into int32), never vpmaddubsw, whose
// int16 pair sums saturate on uint8 x int8 (255 x 127 x 2 > 32,767). Per call, the activation codes widened to
// int16 once (a row's 4 codes of a group one 8-byte broadcast); per block of 16 outputs, its packed weights widened
// to int16 once into an L1-sized panel (K * 32 bytes: 12 KiB at K = 384) that every row tile reads, 2 rows a tile. A group's 16
// outputs x 4 inputs are four vectors of 4 outputs x 4 inputs: vpmaddwd leaves each output as two int32 halves
// (inputs 0-1, 2-3), added at the end (hadd, then a lane permute back into output order).
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void tile256(
    const int16_t* x16, const int16_t* panel, int64_t groups, int64_t kp, __m256i (&acc)[MR][4]) {
  for (int i = 0; i < MR; ++i)
    for (int c = 0; c < 4; ++c) acc[i][c] = _mm256_setzero_si256();
  for (int64_t g = 0; g < groups; ++g) {
    const int16_t* wg = panel + g * 64;
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      int64_t x4;
      std::memcpy(&x4, x16 + i * kp + g * kGroup, 8);
      const __m256i xb = _mm256_set1_epi64x(x4);
      _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) acc[i][c] = _mm256_add_epi32(acc[i][c],
          _mm256_madd_epi16(xb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + c * 16))));
    }
  }
}

// A block's 16 outputs' scales, weight sums and biases (zero past n and for no bias), gathered once per block.
struct Block16 {
  float ws[kBlock] = {}, bias[kBlock] = {};
  int32_t sum[kBlock] = {};
};

template <int MR>
__attribute__((target("avx2,fma"))) void rows256(const QRows& q, const int16_t* x16, const int16_t* panel,
                                                 const Block16& blk, float* Y, int64_t r0, int64_t o, int64_t n,
                                                 int64_t kp) {
  const int64_t groups = kp / kGroup;
  __m256i acc[MR][4];
  tile256<MR>(x16 + r0 * kp, panel, groups, kp, acc);
  const int64_t left = n - o;
  const float *ws16 = blk.ws, *b16 = blk.bias;
  const int32_t* sum16 = blk.sum;
  for (int i = 0; i < MR; ++i) {
    float out[kBlock];
    for (int h = 0; h < 2; ++h) {  // outputs 8 h .. 8 h + 7
      const __m256i sums = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[i][2 * h], acc[i][2 * h + 1]), 0xD8);
      const __m256i corr = _mm256_mullo_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sum16 + 8 * h)),
                                              _mm256_set1_epi32(q.zero[r0 + i]));
      const __m256 v = _mm256_cvtepi32_ps(_mm256_sub_epi32(sums, corr));
      const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(ws16 + 8 * h), _mm256_set1_ps(q.scale[r0 + i]));
      _mm256_storeu_ps(out + 8 * h, _mm256_fmadd_ps(v, s, _mm256_loadu_ps(b16 + 8 * h)));
    }
    if (left >= kBlock)
      std::memcpy(Y + (r0 + i) * n + o, out, sizeof out);
    else
      std::memcpy(Y + (r0 + i) * n + o, out, left * sizeof(float));
  }
}

__attribute__((target("avx2,fma"))) void gemm_avx2(const QRows& q, const int8_t* W, const float* ws,
                                                   const int32_t* wsum, const float* bias, float* Y, int64_t m,
                                                   int64_t n, int64_t kp) {
  const int64_t groups = kp / kGroup, blocks = (n + kBlock - 1) / kBlock;
  thread_local std::vector<int16_t> x16, panel;  // reused across calls
  x16.resize(static_cast<size_t>(m * kp));
  panel.resize(static_cast<size_t>(groups * kBlock * kGroup));
  for (int64_t i = 0; i + 16 <= m * kp; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16.data() + i),
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q.codes.data() + i))));
  for (int64_t i = m * kp / 16 * 16; i < m * kp; ++i) x16[i] = q.codes[i];
  constexpr int MR = 2;  // 8 vectors of sums, 4 of weights, 2 broadcasts: AVX2's 16 registers (3 rows spilled sums)
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* wb = W + b * groups * kBlock * kGroup;
    for (int64_t i = 0; i < groups * 4; ++i)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(panel.data() + i * 16),
                          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + i * 16))));
    const int64_t o = b * kBlock;
    Block16 blk;
    for (int64_t j = 0; j < kBlock && o + j < n; ++j) {
      blk.ws[j] = ws[o + j];
      blk.sum[j] = wsum[o + j];
      blk.bias[j] = bias ? bias[o + j] : 0.f;
    }
    int64_t r = 0;
    for (; r + MR <= m; r += MR) rows256<MR>(q, x16.data(), panel.data(), blk, Y, r, o, n, kp);
    if (m - r == 1) rows256<1>(q, x16.data(), panel.data(), blk, Y, r, o, n, kp);
  }
}
#endif

using Gemm = void (*)(const QRows&, const int8_t*, const float*, const int32_t*, const float*, float*, int64_t,
                      int64_t, int64_t);

Gemm pick_gemm() {
#ifdef CRISP_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return gemm_avx512vnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return gemm_avx2;
#endif
  return gemm_portable;
}

Tensor& qlinear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& w,
                    const executorch::aten::optional<Tensor>& bias, int64_t n, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && w.scalar_type() == ScalarType::Char &&
                      out.scalar_type() == ScalarType::Float && x.dim() >= 1 && n > 0, InvalidArgument, out,
                      "crisp::qlinear: x float32 (..., K), w int8, n > 0");
  const int64_t k = x.size(x.dim() - 1), kp = (k + kGroup - 1) / kGroup * kGroup;
  ET_KERNEL_CHECK_MSG(ctx, k > 0 && w.numel() == crisp_q::buffer_bytes(n, k), InvalidArgument, out,
                      "crisp::qlinear: w is not the packed buffer of an (n, K) weight");
  ET_KERNEL_CHECK_MSG(ctx, !bias.has_value() || (bias.value().scalar_type() == ScalarType::Float &&
                      bias.value().numel() == n), InvalidArgument, out, "crisp::qlinear: bias is not float32 (n,)");
  const int64_t m = x.numel() / k;
  ET_KERNEL_CHECK_MSG(ctx, out.numel() == m * n, InvalidArgument, out,
                      "crisp::qlinear: out has the wrong number of elements");
  static const Gemm gemm = pick_gemm();
  thread_local QRows q;  // reused across calls: no allocation per forward once warm
  quantize_rows(x.const_data_ptr<float>(), m, k, kp, q);
  const int8_t* codes = w.const_data_ptr<int8_t>();
  const float* scales = reinterpret_cast<const float*>(codes + crisp_q::codes_bytes(n, k));
  const int32_t* sums = reinterpret_cast<const int32_t*>(scales + n);
  gemm(q, codes, scales, sums, bias.has_value() ? bias.value().const_data_ptr<float>() : nullptr,
       out.mutable_data_ptr<float>(), m, n, kp);
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(crisp, "qlinear.out", qlinear_out);
