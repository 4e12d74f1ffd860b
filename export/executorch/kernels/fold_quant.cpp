// crisp::fold_quant_(Tensor(a!)[] self, Tensor codes, Tensor mixers, int d_in, bool channel_major) -> (): an int8
// swappable bundle's set_task for one CRISP group in one call. codes: the group's basis as int8 codes stored transposed, (r, u), one
// symmetric scale per term (export/quantize.py basis_codes); mixers (n, r, s): the gated mixers with each term's
// scale already multiplied in (the program's graph does it), so B = codes^T diag(scales) and W_i =
// reshape(codes^T @ mixers[i]): the codes are summed as they are (fold_core.h's int8 path on the transposed
// layout, fold_block_t: 16 codes of a term widened to float by one AVX-512 instruction), never dequantized, and a
// switch reads a quarter of a float basis' bytes. As crisp::fold_ (fold.cpp), the basis is read once for the
// group's n layers, but the product is folded 16 output rows at a time into a small float scratch (fold_core.h's
// fold_channel_blocks, ONNX Runtime's int8 fold's too: every layer's 16 rows, about n * 16 * d_in floats,
// cache-sized) and each block is quantized per output channel into the layer's packed int8 buffer (qlinear.h:
// codes, scales, column sums) straight away: no float copy of the weights, and no packing left for forward
// (crisp::qlinear reads the buffers in place). The codes equal custom_ops.quantize_weight of the float weights
// crisp::fold_ writes from the same codes (as float, (u, r)) and mixers: each product element is the same sum.
// channel_major: the codes' columns are in fold_core.h's channel-major order (16 | d_out, s | d_in; the program
// stores them so where the shapes allow): 16 output channels folded at once, their rows quantized straight into
// the packed blocks (quantize_pack_cm), no per-channel pass over a row of the product. The same codes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../../kernels/fold_core.h"
#include "crisp_kernels.h"
#include "qlinear.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

namespace {

using crisp_q::kBlock;
using crisp_q::kGroup;

// One row of a float weight quantized symmetric (scale = max |w| / 127, 1 for a zero row; codes round(w * (1 /
// scale)), half to even, in -127..127: the reference's arithmetic) straight into its lane of the packed block
// (blk: the row's 4 bytes of group 0; group g's at blk + 64 g; zero past k); returns the scale, sets the sum.
constexpr int64_t kGroupStride = kBlock * kGroup;

float quantize_row_portable(const float* w, int64_t k, int8_t* blk, int32_t& sum) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(w[i]));
  const float scale = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / scale;
  int32_t total = 0;
  for (int64_t i = 0; i < (k + kGroup - 1) / kGroup * kGroup; ++i) {
    const float c = i < k ? std::min(127.f, std::max(-127.f, std::nearbyint(w[i] * inv))) : 0.f;
    blk[(i / kGroup) * kGroupStride + i % kGroup] = static_cast<int8_t>(c);
    total += static_cast<int32_t>(c);
  }
  sum = total;
  return scale;
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same in AVX-512 (the compiler's own vectorisation of the loops above ran at a quarter of the fold's speed:
// a scalar max chain, 128-bit blends). roundscale to nearest is nearbyint's half to even; four independent maxima
// (one chain waits on each vmaxps); each 16 codes leave as four 4-byte stores, one per group.
__attribute__((target("avx512f,avx512bw"))) float quantize_row_avx512(const float* w, int64_t k, int8_t* blk,
                                                                    int32_t& sum) {
  __m512 m0 = _mm512_setzero_ps(), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_loadu_ps(w + i)));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(_mm512_loadu_ps(w + i + 16)));
    m2 = _mm512_max_ps(m2, _mm512_abs_ps(_mm512_loadu_ps(w + i + 32)));
    m3 = _mm512_max_ps(m3, _mm512_abs_ps(_mm512_loadu_ps(w + i + 48)));
  }
  for (; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, w + i)));
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
  const float scale = amax > 0.f ? amax / 127.f : 1.f;
  const __m512 vs = _mm512_set1_ps(1.f / scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  __m512i vsum = _mm512_setzero_si512();
  const int64_t groups = (k + kGroup - 1) / kGroup;
  for (i = 0; i < k; i += 16) {
    const __mmask16 m = k - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - i)) - 1);
    __m512 c = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), vs),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, c)));
    vsum = _mm512_add_epi32(vsum, q);  // lanes past k: 0 * inv = 0
    const __m128i b = _mm512_cvtsepi32_epi8(q);
    int8_t* dst = blk + (i / kGroup) * kGroupStride;
    const int64_t left = std::min<int64_t>(4, groups - i / kGroup);
    int32_t d[4];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d), b);
    for (int64_t g = 0; g < left; ++g) std::memcpy(dst + g * kGroupStride, d + g, 4);
  }
  sum = _mm512_reduce_add_epi32(vsum);
  return scale;
}
#endif

// Rows [o0, o0 + rows) of a float (N, K) weight (row-major, w pointing at row o0) quantized into buf (the whole
// layer's buffer, qlinear.h).
void quantize_pack_rows(const float* w, int64_t o0, int64_t rows, int64_t n, int64_t k, int8_t* buf) {
  const int64_t groups = (k + kGroup - 1) / kGroup;
  float* scales = reinterpret_cast<float*>(buf + crisp_q::codes_bytes(n, k));
  int32_t* sums = reinterpret_cast<int32_t*>(scales + n);
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx512 = __builtin_cpu_supports("avx512bw");
  const auto row = avx512 ? quantize_row_avx512 : quantize_row_portable;
#else
  const auto row = quantize_row_portable;
#endif
  for (int64_t q = 0; q < rows; ++q) {
    const int64_t o = o0 + q;
    int8_t* blk = buf + (o / kBlock) * groups * kGroupStride + (o % kBlock) * kGroup;
    scales[o] = row(w + q * k, k, blk, sums[o]);
  }
}

// A channel-major block (fold_core.h's fold_channel_major: row j of channels [o0, o0 + oc) at w + j * CM_GROUP, oc a
// multiple of kBlock) quantized into the layer's packed buffer: per block of kBlock channels, each channel's scale
// from the maximum down its column, then each group of kGroup inputs' rows quantized and interleaved into the
// group's 64 bytes (channel q's kGroup codes at kGroup q), and the column sums. The same arithmetic as
// quantize_row_*: codes nearbyint(w * (1 / scale)), the product rounded before the rounding; no clamp (|w| is at
// most the channel's maximum, so |w * (1 / scale)| exceeds 127 by a rounding at most, which rounds back to 127; a
// clamp's compare is control flow GCC does not vectorise under IEEE semantics).
CRISP_FOLD_MULTIVERSION
void quantize_pack_cm(const float* w, int64_t o0, int64_t oc, int64_t n, int64_t k, int8_t* buf) {
  constexpr int64_t stride = crisp_fold::CM_GROUP;
  const int64_t groups = (k + kGroup - 1) / kGroup;
  float* scales = reinterpret_cast<float*>(buf + crisp_q::codes_bytes(n, k));
  int32_t* sums = reinterpret_cast<int32_t*>(scales + n);
  for (int64_t sb = 0; sb < oc; sb += kBlock) {
    float amax[kBlock] = {}, inv[kBlock];
    for (int64_t j = 0; j < k; ++j) {
      const float* row = w + j * stride + sb;
#pragma omp simd
      for (int64_t q = 0; q < kBlock; ++q) amax[q] = std::max(amax[q], std::fabs(row[q]));
    }
    for (int64_t q = 0; q < kBlock; ++q) {
      const float scale = amax[q] > 0.f ? amax[q] / 127.f : 1.f;
      scales[o0 + sb + q] = scale;
      inv[q] = 1.f / scale;
    }
    int32_t total[kBlock] = {};
    int8_t* blk = buf + (o0 + sb) / kBlock * groups * kGroupStride;
    for (int64_t g = 0; g < groups; ++g) {
      int32_t c[kGroup][kBlock] = {};
      for (int64_t t = 0; t < kGroup && g * kGroup + t < k; ++t) {
        const float* row = w + (g * kGroup + t) * stride + sb;
#pragma omp simd
        for (int64_t q = 0; q < kBlock; ++q) {
          c[t][q] = static_cast<int32_t>(std::nearbyint(row[q] * inv[q]));  // |w| <= max: within -127..127
          total[q] += c[t][q];
        }
      }
      int8_t out[kBlock * kGroup];
      for (int64_t q = 0; q < kBlock; ++q)
        for (int64_t t = 0; t < kGroup; ++t) out[q * kGroup + t] = static_cast<int8_t>(c[t][q]);
      std::memcpy(blk + g * kGroupStride, out, sizeof out);
    }
    for (int64_t q = 0; q < kBlock; ++q) sums[o0 + sb + q] = total[q];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// A group's four rows of 16 channel codes (c[t]: input t) interleaved into its 64 bytes, channel q's four codes at
// 4 q, by two rounds of unpacking (SSE2): the AVX-512 and AVX2 packers' last step.
inline void interleave_group(const __m128i (&c)[kGroup], int8_t* dst) {
  const __m128i a0 = _mm_unpacklo_epi8(c[0], c[1]), a1 = _mm_unpackhi_epi8(c[0], c[1]);
  const __m128i b0 = _mm_unpacklo_epi8(c[2], c[3]), b1 = _mm_unpackhi_epi8(c[2], c[3]);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_unpacklo_epi16(a0, b0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm_unpackhi_epi16(a0, b0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm_unpacklo_epi16(a1, b1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 48), _mm_unpackhi_epi16(a1, b1));
}

// The same in AVX-512 (the loops above ran at a fifth of the fold's speed): a block's 16 channels are one vector
// across a row; roundscale to nearest is nearbyint's half to even; each group's four rows of codes interleaved into
// its 64 bytes by two rounds of unpacking (channel q's four codes at 4 q).
__attribute__((target("avx512f,avx512bw"))) void quantize_pack_cm_avx512(const float* w, int64_t o0, int64_t oc,
                                                                        int64_t n, int64_t k, int8_t* buf) {
  constexpr int64_t stride = crisp_fold::CM_GROUP;
  static_assert(kBlock == 16 && kGroup == 4, "16 channels a vector, 4 inputs a group");
  const int64_t groups = (k + kGroup - 1) / kGroup;
  float* scales = reinterpret_cast<float*>(buf + crisp_q::codes_bytes(n, k));
  int32_t* sums = reinterpret_cast<int32_t*>(scales + n);
  const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f), zero = _mm512_setzero_ps();
  alignas(64) float mx[crisp_fold::CM_GROUP];  // every block's channel maxima in one pass down the rows
  crisp_fold::block_absmax_avx512(w, k, oc / kBlock, mx);
  for (int64_t sb = 0; sb < oc; sb += kBlock) {
    const __m512 amax = _mm512_load_ps(mx + sb);
    const __mmask16 pos = _mm512_cmp_ps_mask(amax, zero, _CMP_GT_OQ);
    const __m512 scale = _mm512_mask_div_ps(_mm512_set1_ps(1.f), pos, amax, hi);  // amax / 127, 1 where zero
    _mm512_storeu_ps(scales + o0 + sb, scale);
    const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), scale);
    __m512i total = _mm512_setzero_si512();
    int8_t* blk = buf + (o0 + sb) / kBlock * groups * kGroupStride;
    for (int64_t g = 0; g < groups; ++g) {
      __m128i c[kGroup];
      for (int64_t t = 0; t < kGroup; ++t) {
        const int64_t jj = g * kGroup + t;
        if (jj >= k) {
          c[t] = _mm_setzero_si128();
          continue;
        }
        const __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(w + jj * stride + sb), inv),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i q = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, v)));
        total = _mm512_add_epi32(total, q);
        c[t] = _mm512_cvtepi32_epi8(q);
      }
      interleave_group(c, blk + g * kGroupStride);
    }
    _mm512_storeu_si512(sums + o0 + sb, total);
  }
}

// The same in AVX2 (a CPU without AVX-512: the loops above ran at a third of the AVX2 fold's speed there): a block's
// 16 channels are two vectors across a row; round to nearest is nearbyint's half to even; each row's 16 codes
// narrowed by two packs and a lane permute, then interleaved into the group's 64 bytes (interleave_group).
__attribute__((target("avx2,fma"))) void quantize_pack_cm_avx2(const float* w, int64_t o0, int64_t oc, int64_t n,
                                                               int64_t k, int8_t* buf) {
  constexpr int64_t stride = crisp_fold::CM_GROUP;
  static_assert(kBlock == 16 && kGroup == 4, "16 channels two vectors, 4 inputs a group");
  const int64_t groups = (k + kGroup - 1) / kGroup;
  float* scales = reinterpret_cast<float*>(buf + crisp_q::codes_bytes(n, k));
  int32_t* sums = reinterpret_cast<int32_t*>(scales + n);
  for (int64_t sb = 0; sb < oc; sb += kBlock) {
    alignas(32) float amax[kBlock], inv[kBlock];
    crisp_fold::column_absmax_avx2(w, k, sb, amax);
    for (int64_t q = 0; q < kBlock; ++q) {  // as quantize_pack_cm
      const float scale = amax[q] > 0.f ? amax[q] / 127.f : 1.f;
      scales[o0 + sb + q] = scale;
      inv[q] = 1.f / scale;
    }
    const __m256 inv0 = _mm256_load_ps(inv), inv1 = _mm256_load_ps(inv + 8);
    __m256i total0 = _mm256_setzero_si256(), total1 = _mm256_setzero_si256();
    int8_t* blk = buf + (o0 + sb) / kBlock * groups * kGroupStride;
    for (int64_t g = 0; g < groups; ++g) {
      __m128i c[kGroup];
      for (int64_t t = 0; t < kGroup; ++t) {
        const int64_t jj = g * kGroup + t;
        if (jj >= k) {
          c[t] = _mm_setzero_si128();
          continue;
        }
        const float* row = w + jj * stride + sb;
        constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        const __m256i q0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row), inv0), kRound));
        const __m256i q1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(row + 8), inv1), kRound));
        total0 = _mm256_add_epi32(total0, q0);
        total1 = _mm256_add_epi32(total1, q1);
        const __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);  // 16 int16 in order
        c[t] = _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
      }
      interleave_group(c, blk + g * kGroupStride);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + o0 + sb), total0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums + o0 + sb + 8), total1);
  }
}
#endif

void fold_quant_(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  // stack: self (tensor list), codes, mixers, d_in, channel_major[, the empty list the emitter gives an op
  // returning ()]
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 5 && stack[0]->isTensorList() && stack[1]->isTensor() &&
                      stack[2]->isTensor() && stack[3]->isInt() && stack[4]->isBool(), InvalidArgument, ,
                      "crisp::fold_quant_(Tensor[] self, Tensor codes, Tensor mixers, int d_in, bool channel_major)");
  ArrayRef<Tensor> ws = stack[0]->toTensorList();
  const Tensor& codes = stack[1]->toTensor();
  const Tensor& mixers = stack[2]->toTensor();
  const int64_t d_in = stack[3]->toInt();
  const bool channel_major = stack[4]->toBool();
  ET_KERNEL_CHECK_MSG(ctx, codes.dim() == 2 && codes.scalar_type() == ScalarType::Char, InvalidArgument, ,
                      "crisp::fold_quant_: codes must be the int8 basis stored transposed, (r, u)");
  ET_KERNEL_CHECK_MSG(ctx, mixers.dim() == 3 && mixers.scalar_type() == ScalarType::Float, InvalidArgument, ,
                      "crisp::fold_quant_: mixers must be float32 (n, r, s), each term's scale multiplied in");
  const int64_t r = codes.size(0), u = codes.size(1), n = mixers.size(0), s = mixers.size(2);
  ET_KERNEL_CHECK_MSG(ctx, mixers.size(1) == r && static_cast<int64_t>(ws.size()) == n && d_in > 0 &&
                      (u * s) % d_in == 0, InvalidArgument, ,
                      "crisp::fold_quant_: mixers (n, r, s), n buffers and d_in do not match the codes (r, u)");
  const int64_t d_out = u * s / d_in;
  std::vector<int8_t*> bufs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, ws[i].scalar_type() == ScalarType::Char &&
                        ws[i].numel() == crisp_q::buffer_bytes(d_out, d_in), InvalidArgument, ,
                        "crisp::fold_quant_: a buffer is not int8 of qlinear.h's size for (d_out, d_in)");
    bufs[i] = ws[i].mutable_data_ptr<int8_t>();
  }
  if (channel_major) {  // the codes' columns in fold_core.h's channel-major order
    ET_KERNEL_CHECK_MSG(ctx, d_out % crisp_fold::QCH == 0 && d_in % s == 0, InvalidArgument, ,
                        "crisp::fold_quant_: channel-major codes need 16 | d_out and s | d_in");
#if defined(__x86_64__) && defined(__GNUC__)
    static const bool avx512 = __builtin_cpu_supports("avx512bw"), avx2 = __builtin_cpu_supports("avx2") &&
                                                                          __builtin_cpu_supports("fma");
    const auto quantize = avx512 ? quantize_pack_cm_avx512 : (avx2 ? quantize_pack_cm_avx2 : quantize_pack_cm);
#else
    const auto quantize = quantize_pack_cm;
#endif
    crisp_fold::fold_channel_major(codes.const_data_ptr<int8_t>(), u, r, mixers.const_data_ptr<float>(), n, s, d_out,
                                   d_in, [&](int64_t i, int64_t o0, int64_t oc, const float* w) {
                                     quantize(w, o0, oc, d_out, d_in, bufs[i]);
                                   });
  } else {
    crisp_fold::fold_channel_blocks(codes.const_data_ptr<int8_t>(), /*ks=*/1, /*ts=*/u, u, r,
                                    mixers.const_data_ptr<float>(), n, s, d_out, d_in,
                                    [&](int64_t i, int64_t o0, int64_t oc, const float* w) {
                                      quantize_pack_rows(w, o0, oc, d_out, d_in, bufs[i]);
                                    });
  }
  const int64_t groups = (d_in + kGroup - 1) / kGroup, pad = (d_out + kBlock - 1) /
                         kBlock * kBlock;
  for (int64_t i = 0; i < n; ++i)  // the last block's lanes past d_out: zero codes (they meet no output)
    for (int64_t o = d_out; o < pad; ++o)
      for (int64_t gi = 0; gi < groups; ++gi)
        std::fill_n(bufs[i] + ((o / kBlock) * groups + gi) * kBlock * kGroup +
                    (o % kBlock) * kGroup, kGroup, int8_t(0));
}

// Boxed, as crisp::fold_: its outputs are the tensors of its list argument.
const auto registered =
    executorch::runtime::register_kernel(executorch::runtime::Kernel("crisp::fold_quant_", fold_quant_));

}  // namespace
