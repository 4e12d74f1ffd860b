// The fused CRISP fold: every layer of one group, W_i = reshape(B @ G(A_i)), in one pass that reads the basis
// once. Shared by crisp-edge's ExecuTorch operator crisp::fold_ (export/executorch/kernels/fold.cpp) and the
// plain C entry point ONNX Runtime's Python session calls (fold_c.cpp, export/fold_kernel.py). Portable C++:
// `#pragma omp simd` loops, built once per x86-64 vector width (target_clones) and by the compiler's own
// vectorisation elsewhere (aarch64: NEON); on x86-64, AVX-512 and AVX2 passes in intrinsics (an int8 basis' pass,
// fold_block_t_avx512; the AVX2 ones) are chosen at run time behind the same guard as the clones.
//
// B is (u, r), read with strides (row k, term t at B[k * ks + t * ts]): (u, r) row-major (ks = r, ts = 1), as
// ExecuTorch programs hold it, or stored transposed, (r, u) (ks = 1, ts = u), as ONNX fold graphs hold it. g:
// the gated mixers (n, r, s). outs[i]: layer i's (u, s) product, row-major (the row-major reshape is W_i).
//
// Per ROWS rows of the product: the n * s columns of every layer at once, sums over the r terms in order
// t = 0..r-1 (the mixers laid out column-wise, zero-padded to CHUNK columns, so the sums stay in registers),
// then each layer's s values of each row stored where its W wants them (with s = 4, one 4-float store). The
// basis stored transposed takes fold_block_t instead, V rows at a time along its stored direction.
//
// -DCRISP_FOLD_NO_MULTIVERSION builds one version for the compiler's target flags alone (e.g. -mavx2 -mfma:
// how to time a narrower vector width on a machine that has a wider one).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <vector>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // the AVX2 / AVX-512 paths chosen at run time
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CRISP_FOLD_NO_MULTIVERSION)
// x86-64-v3: AVX2 with FMA in one clone ("avx2,fma" in target_clones is two clones, AVX2 without FMA and FMA without
// AVX2, and a CPU without AVX-512 ran the first: a multiply and an add where one FMA does).
#define CRISP_FOLD_MULTIVERSION __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#define CRISP_FOLD_AVX512_CODES 1  // fold_block_t's int8 codes widened by one AVX-512 instruction, chosen at run time
#include <immintrin.h>
#else
#define CRISP_FOLD_MULTIVERSION
#endif

namespace crisp_fold {

constexpr int64_t CHUNK = 16;  // product columns per pass: one AVX-512 vector, two AVX2 / four NEON vectors
constexpr int64_t ROWS = 4;    // rows per pass: independent sums (one alone waits on each multiply-add's latency)

// Rows [k, k + rows) of the product, b pointing at row k (ROWS rows readable, zero past `rows`). mt: (r, cpad)
// the mixers column-wise, column c = layer c / s's column c % s, zero past ncol = n * s; col[c]: where column
// c's value of row 0 goes (layer c / s's output + c % s; row k's is k * s further).
// T: the basis' element type, float, or int8_t (a swappable int8 bundle's bases: the per-term scale is folded into
// the mixers, so the codes are summed as they are).
template <typename T>
__attribute__((always_inline)) inline void fold_block_body(const T* b, int64_t ks, int64_t ts, const float* mt,
                                                           float* const* col, int64_t k, int64_t rows, int64_t r,
                                                           int64_t s, int64_t ncol, int64_t cpad) {
  for (int64_t c0 = 0; c0 < cpad; c0 += CHUNK) {
    float acc[ROWS][CHUNK] = {};
    for (int64_t t = 0; t < r; ++t) {
      const float* m = mt + t * cpad + c0;
#pragma GCC unroll 4  // ROWS: unrolled also at -O2 (the runners' builds), so the sums stay in registers
      for (int64_t q = 0; q < ROWS; ++q) {
        const float bt = b[q * ks + t * ts];
#pragma omp simd
        for (int64_t c = 0; c < CHUNK; ++c) acc[q][c] += bt * m[c];
      }
    }
    const int64_t end = std::min(CHUNK, ncol - c0);
    if (s == 4) {  // crisp-edge's default s, with the width known: one 4-float store per row and layer
      for (int64_t c = 0; c < end; c += 4) {
        float* o = col[c0 + c] + k * 4;
        for (int64_t q = 0; q < rows; ++q)
          for (int64_t j = 0; j < 4; ++j) o[q * 4 + j] = acc[q][c + j];
      }
    } else if (CHUNK % s == 0) {  // whole layers in the chunk: each one's rows [k, k + rows) are contiguous
      for (int64_t c = 0; c < end; c += s) {
        float* o = col[c0 + c] + k * s;
        for (int64_t q = 0; q < rows; ++q)
          for (int64_t j = 0; j < s; ++j) o[q * s + j] = acc[q][c + j];
      }
    } else {
      for (int64_t q = 0; q < rows; ++q)
        for (int64_t c = 0; c < end; ++c) col[c0 + c][(k + q) * s] = acc[q][c];
    }
  }
}
CRISP_FOLD_MULTIVERSION
static void fold_block(const float* b, int64_t ks, int64_t ts, const float* mt, float* const* col, int64_t k,
                       int64_t rows, int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  fold_block_body(b, ks, ts, mt, col, k, rows, r, s, ncol, cpad);
}
CRISP_FOLD_MULTIVERSION
static void fold_block(const int8_t* b, int64_t ks, int64_t ts, const float* mt, float* const* col, int64_t k,
                       int64_t rows, int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  fold_block_body(b, ks, ts, mt, col, k, rows, r, s, ncol, cpad);
}

// The basis stored transposed, (r, u) (ks = 1), as ONNX fold graphs hold it: rows [k, k + V) of the product,
// vectorised along the basis' stored direction (term t's V values are one contiguous load, multiplied by each
// product column's mixer value: CHUNK independent sums per term), then each layer's s values of each row
// interleaved where its W wants them (fold_block's sums, along the product's rows, would read each term's
// values ROWS at a time, r strided streams). Each term's row is also fetched PREFETCH floats ahead: r separate
// streams are more than the hardware's prefetcher keeps ahead of on its own. bench/bench_fold_layouts.py
// --crisp-kernel times both paths at ViT-S's shapes.
constexpr int64_t V = 16;
constexpr int64_t PREFETCH = 2048;
// Term t's V values as float into bv (fold_block_t_body's Widen): a loop the compiler vectorises. On x86-64 an
// int8 basis' codes are widened as whole vectors instead, int8 -> int16 -> int32 -> float (GCC's vector
// extensions: sign extensions and one conversion) and stored as one vector: from the loop GCC widens them a
// quarter vector at a time into bv, and the sums read bv back as one AVX2/AVX-512 vector, a load no store
// forwards to, a stall every term (it made the int8 fold slower than the float one although it reads a quarter
// of the bytes; int8 straight to int32 or float, GCC converts one code at a time). NEON's vectors are the
// quarter, so aarch64 keeps the loop (where GCC 12 converts a 16-lane int32 vector extension one lane at a time).
struct WidenLoop {
  template <typename T>
  __attribute__((always_inline)) static inline void apply(const T* bt, float* bv) {
#pragma omp simd
    for (int64_t q = 0; q < V; ++q) bv[q] = static_cast<float>(bt[q]);
  }
#if defined(__x86_64__)
  __attribute__((always_inline)) static inline void apply(const int8_t* bt, float* bv) {
    static_assert(V == 16, "one 16-code vector a term");
    typedef int8_t i8x16 __attribute__((vector_size(16)));
    typedef int16_t i16x16 __attribute__((vector_size(32)));
    typedef int32_t i32x16 __attribute__((vector_size(64)));
    typedef float f32x16 __attribute__((vector_size(64)));
    i8x16 c;
    std::memcpy(&c, bt, sizeof c);
    const f32x16 f = __builtin_convertvector(
        __builtin_convertvector(__builtin_convertvector(c, i16x16), i32x16), f32x16);
    std::memcpy(bv, &f, sizeof f);
  }
#endif
};
// k: the row read (for how far ahead a fetch stays inside the basis), kw: where its values are written (rows
// of a scratch block, when fold_quant_group folds part of the product at a time). s = CM (a channel-major basis,
// fold_channel_major): each column's V values are stored as they are, contiguous at col[c] + kw.
constexpr int64_t CM = 0;
// A pass' sums (acc[c]: column c's V values) stored where their layers want them, columns [0, end) of col.
__attribute__((always_inline)) inline void store_columns(const float (&acc)[CHUNK][V], float* const* col, int64_t kw,
                                                         int64_t s, int64_t end) {
  if (s == CM) {
    for (int64_t c = 0; c < end; ++c) std::memcpy(col[c] + kw, acc[c], sizeof acc[c]);
  } else if (s == 4) {  // crisp-edge's default s: the four columns of a layer interleaved in registers, then stored
    for (int64_t c = 0; c < end; c += 4) {
      float* o = col[c] + kw * 4;
#pragma omp simd
      for (int64_t q = 0; q < V; ++q) {
        o[q * 4 + 0] = acc[c][q];
        o[q * 4 + 1] = acc[c + 1][q];
        o[q * 4 + 2] = acc[c + 2][q];
        o[q * 4 + 3] = acc[c + 3][q];
      }
    }
  } else {
    for (int64_t q = 0; q < V; ++q)
      for (int64_t c = 0; c < end; ++c) col[c][(kw + q) * s] = acc[c][q];
  }
}
template <typename T, typename Widen>
__attribute__((always_inline)) inline void fold_block_t_body(const T* b, int64_t ts, const float* mt,
                                                             float* const* col, int64_t k, int64_t kw, int64_t u,
                                                             int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  const bool ahead = k + V + PREFETCH <= u;
  for (int64_t c0 = 0; c0 < cpad; c0 += CHUNK) {
    float acc[CHUNK][V] = {};
    for (int64_t t = 0; t < r; ++t) {
      const float* m = mt + t * cpad + c0;
      const T* bt = b + t * ts;
      if (ahead && c0 == 0) __builtin_prefetch(bt + PREFETCH);
      float bv[V];  // term t's V values as float once (int8 codes converted here, not in every column's sums)
      Widen::apply(bt, bv);
#pragma GCC unroll 16  // CHUNK: every column's sums stay in registers
      for (int64_t c = 0; c < CHUNK; ++c) {
        const float mc = m[c];
#pragma omp simd
        for (int64_t q = 0; q < V; ++q) acc[c][q] += mc * bv[q];
      }
    }
    store_columns(acc, col + c0, kw, s, std::min(CHUNK, ncol - c0));
  }
}
CRISP_FOLD_MULTIVERSION
static void fold_block_t_f32(const float* b, int64_t ts, const float* mt, float* const* col, int64_t k, int64_t kw,
                             int64_t u, int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  fold_block_t_body<float, WidenLoop>(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
}
CRISP_FOLD_MULTIVERSION
static void fold_block_t_i8(const int8_t* b, int64_t ts, const float* mt, float* const* col, int64_t k, int64_t kw,
                            int64_t u, int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  fold_block_t_body<int8_t, WidenLoop>(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
}
#ifdef CRISP_FOLD_AVX512_CODES
// With AVX-512, an int8 basis' pass in intrinsics: each term's 16 codes widened by vpmovsxbd + vcvtdq2ps (GCC 12
// vectorises the portable widening in nine shuffles and sign extensions a term), the CHUNK columns' sums 16
// registers, each one multiply-add a term (fold_block_t_body's contracted sums, in the same order: the same values).
// The portable body's zero-initialised sums, a 1 KiB array, cost a `rep stos` at every pass that GCC left in
// although the sums live in registers (7% of the channel-major fold's time, measured with perf).
__attribute__((target("avx512f"))) static void fold_block_t_avx512(const int8_t* b, int64_t ts, const float* mt,
                                                                  float* const* col, int64_t k, int64_t kw, int64_t u,
                                                                  int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  static_assert(V == 16 && CHUNK == 16, "a column's V values one vector, a pass' CHUNK columns 16 registers");
  const bool ahead = k + V + PREFETCH <= u;
  for (int64_t c0 = 0; c0 < cpad; c0 += CHUNK) {
    __m512 acc[CHUNK];
    for (int64_t c = 0; c < CHUNK; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < r; ++t) {
      const float* m = mt + t * cpad + c0;
      const int8_t* bt = b + t * ts;
      if (ahead && c0 == 0) __builtin_prefetch(bt + PREFETCH);
      const __m512 bv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bt))));
      for (int64_t c = 0; c < CHUNK; ++c) acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(m[c]), bv, acc[c]);
    }
    const int64_t end = std::min(CHUNK, ncol - c0);
    if (s == CM && end == CHUNK) {  // each column's values stored as they are, straight from its register (a loop
      // to a run-time end indexes the sums: GCC spilled all 16 to the stack first, half the pass' time at small r)
#pragma GCC unroll 16
      for (int64_t c = 0; c < CHUNK; ++c) _mm512_storeu_ps(col[c0 + c] + kw, acc[c]);
    } else {
      float out[CHUNK][V];
      for (int64_t c = 0; c < CHUNK; ++c) _mm512_storeu_ps(out[c], acc[c]);
      store_columns(out, col + c0, kw, s, end);
    }
  }
}

// AVX2 without AVX-512 (e.g. AMD Zen 3): fold_block_t_body keeps CHUNK x V = 256 sums in registers, 16 AVX-512
// vectors but 32 AVX2 ones, twice the 16 registers AVX2 has: its AVX2 clone spilled every sum on every term (ViT-S's
// groups 4x the AVX-512 time, not 2x). Here the pass' r terms are widened to float once (V values each, into bv),
// then the columns are summed NC at a time (NC x 2 vectors of sums, two of the term's values, one mixer broadcast:
// 15 registers at NC = 6), each column's sums over t = 0..r-1 in order as fold_block_t_body's: the same values.
constexpr int64_t AVX2_MAX_R = 128;  // terms a pass widens into its stack buffer (more: the portable clone)
template <int NC>
__attribute__((target("avx2,fma"), always_inline)) inline void columns_avx2(const float* bv, const float* mt,
                                                                            int64_t cpad, int64_t c0, int64_t r,
                                                                            float (*out)[V]) {
  __m256 acc[NC][2];
  for (int c = 0; c < NC; ++c) acc[c][0] = acc[c][1] = _mm256_setzero_ps();
  for (int64_t t = 0; t < r; ++t) {
    const __m256 b0 = _mm256_loadu_ps(bv + t * V), b1 = _mm256_loadu_ps(bv + t * V + 8);
    const float* m = mt + t * cpad + c0;
    for (int c = 0; c < NC; ++c) {
      const __m256 mc = _mm256_broadcast_ss(m + c);
      acc[c][0] = _mm256_fmadd_ps(mc, b0, acc[c][0]);  // one rounding, as the x86-64-v3 clones' contracted sums
      acc[c][1] = _mm256_fmadd_ps(mc, b1, acc[c][1]);
    }
  }
  for (int c = 0; c < NC; ++c) {
    _mm256_storeu_ps(out[c], acc[c][0]);
    _mm256_storeu_ps(out[c] + 8, acc[c][1]);
  }
}
template <typename T>
__attribute__((target("avx2,fma"))) static void fold_block_t_avx2(const T* b, int64_t ts, const float* mt,
                                                                  float* const* col, int64_t k, int64_t kw, int64_t u,
                                                                  int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
  static_assert(V == 16, "two AVX2 vectors a column");
  const bool ahead = k + V + PREFETCH <= u;
  alignas(32) float bv[AVX2_MAX_R * V];
  for (int64_t t = 0; t < r; ++t) {
    const T* bt = b + t * ts;
    if (ahead) __builtin_prefetch(bt + PREFETCH);
    if constexpr (sizeof(T) == 1) {
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bt));
      _mm256_store_ps(bv + t * V, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c)));
      _mm256_store_ps(bv + t * V + 8, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(c, 8))));
    } else {
      _mm256_store_ps(bv + t * V, _mm256_loadu_ps(bt));
      _mm256_store_ps(bv + t * V + 8, _mm256_loadu_ps(bt + 8));
    }
  }
  // s = 4: a layer's four columns together (interleaved on the way out); otherwise six columns a step
  const int64_t step = s == 4 ? 4 : 6;
  for (int64_t c0 = 0; c0 < ncol; c0 += step) {
    const int64_t nc = std::min(step, ncol - c0);
    float out[6][V];
    switch (nc) {
      case 6: columns_avx2<6>(bv, mt, cpad, c0, r, out); break;
      case 5: columns_avx2<5>(bv, mt, cpad, c0, r, out); break;
      case 4: columns_avx2<4>(bv, mt, cpad, c0, r, out); break;
      case 3: columns_avx2<3>(bv, mt, cpad, c0, r, out); break;
      case 2: columns_avx2<2>(bv, mt, cpad, c0, r, out); break;
      default: columns_avx2<1>(bv, mt, cpad, c0, r, out); break;
    }
    if (s == CM) {
      for (int64_t c = 0; c < nc; ++c) std::memcpy(col[c0 + c] + kw, out[c], sizeof out[c]);
    } else if (s == 4) {
      float* o = col[c0] + kw * 4;
      for (int64_t q = 0; q < V; ++q)
        for (int64_t j = 0; j < 4; ++j) o[q * 4 + j] = out[j][q];
    } else {
      for (int64_t q = 0; q < V; ++q)
        for (int64_t c = 0; c < nc; ++c) col[c0 + c][(kw + q) * s] = out[c][q];
    }
  }
}
#endif
// Which x86-64 path the transposed passes and the channel-major quantization take: AVX-512 (its clones and
// intrinsics), AVX2 without it (fold_block_t_avx2, quantize_cm_avx2), or the rest (the clones).
enum class SimdPath { avx512, avx2, other };
inline SimdPath simd_path() {
#ifdef CRISP_FOLD_AVX512_CODES
  static const SimdPath p = __builtin_cpu_supports("avx512f")                                   ? SimdPath::avx512
                            : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? SimdPath::avx2
                                                                                              : SimdPath::other;
  return p;
#else
  return SimdPath::other;
#endif
}
static void fold_block_t(const float* b, int64_t ts, const float* mt, float* const* col, int64_t k, int64_t kw,
                         int64_t u, int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
#ifdef CRISP_FOLD_AVX512_CODES
  if (simd_path() == SimdPath::avx2 && r <= AVX2_MAX_R)
    return fold_block_t_avx2(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
#endif
  fold_block_t_f32(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
}
static void fold_block_t(const int8_t* b, int64_t ts, const float* mt, float* const* col, int64_t k, int64_t kw,
                         int64_t u, int64_t r, int64_t s, int64_t ncol, int64_t cpad) {
#ifdef CRISP_FOLD_AVX512_CODES
  if (simd_path() == SimdPath::avx512) return fold_block_t_avx512(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
  if (simd_path() == SimdPath::avx2 && r <= AVX2_MAX_R)
    return fold_block_t_avx2(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
#endif
  fold_block_t_i8(b, ts, mt, col, k, kw, u, r, s, ncol, cpad);
}

// Rows [kb, ke) of the product of every layer, row k written at col[c] + (k - kb) * s: mt, col as fold_block's.
template <typename T>
inline void fold_rows(const T* B, int64_t ks, int64_t ts, int64_t u, int64_t r, const float* mt, float* const* col,
                      int64_t s, int64_t ncol, int64_t cpad, int64_t kb, int64_t ke) {
  int64_t k = kb;
  if (ks == 1)  // stored transposed: V rows at a time along the stored direction, the rest as below
    for (; k + V <= ke; k += V) fold_block_t(B + k, ts, mt, col, k, k - kb, u, r, s, ncol, cpad);
  for (; k + ROWS <= ke; k += ROWS) fold_block(B + k * ks, ks, ts, mt, col, k - kb, ROWS, r, s, ncol, cpad);
  if (k < ke) {  // the last rows (fewer than ROWS), copied (r, ROWS-row-major) and zero-padded
    std::vector<float> tail(static_cast<size_t>(ROWS * r), 0.f);
    for (int64_t q = 0; q < ke - k; ++q)
      for (int64_t t = 0; t < r; ++t) tail[q * r + t] = B[(k + q) * ks + t * ts];
    fold_block(tail.data(), r, 1, mt, col, k - kb, ke - k, r, s, ncol, cpad);
  }
}

// g (n, r, s) laid out column-wise, zero-padded to cpad columns (fold_block's mt).
inline std::vector<float> mixer_columns(const float* g, int64_t n, int64_t r, int64_t s, int64_t cpad) {
  std::vector<float> mt(static_cast<size_t>(r * cpad), 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < r; ++t)
      for (int64_t j = 0; j < s; ++j) mt[t * cpad + i * s + j] = g[(i * r + t) * s + j];
  return mt;
}

// The whole group: B (u, r) read with strides ks, ts (above), g (n, r, s) gated, outs[i] (u, s) row-major.
inline void fold_group(const float* B, int64_t ks, int64_t ts, int64_t u, int64_t r, const float* g, int64_t n,
                       int64_t s, float* const* outs) {
  const int64_t ncol = n * s, cpad = (ncol + CHUNK - 1) / CHUNK * CHUNK;
  const std::vector<float> mt = mixer_columns(g, n, r, s, cpad);
  std::vector<float*> col(static_cast<size_t>(ncol));
  for (int64_t c = 0; c < ncol; ++c) col[c] = outs[c / s] + c % s;
  fold_rows(B, ks, ts, u, r, mt.data(), col.data(), s, ncol, cpad, 0, u);
}

// Symmetric int8 quantization per output channel to codes in -qmax..qmax (qmax <= 127: 127, or 64 for ONNX
// Runtime's 7-bit weights, export/onnx/quantize.py WEIGHT_QMAX): scale = absmax / qmax (1 for an all-zero channel,
// whose codes are 0 anyway), code = round-half-even(w * qmax / absmax), with no clamp (|w * qmax / absmax| exceeds
// qmax by a rounding at most, which rounds back to qmax; a clamp's compare is control flow GCC will not vectorise
// under IEEE semantics). Rounding adds and subtracts 1.5 * 2^23 (exact round-half-even for |x| < 2^22 in the
// default rounding mode, and vectorised everywhere, where nearbyint is a library call on some targets).
constexpr float ROUNDER = 12582912.f;

// max |w[j]| over a channel: four independent 16-lane maxima (one chain would wait on each max's latency), folded
// into one vector and then across its lanes by halves (GCC's vector extensions: the clone's widest vectors). A
// scalar loop over the lanes took a quarter of the quantizing fold's time.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
CRISP_FOLD_MULTIVERSION
static float channel_absmax(const float* w, int64_t d_in) {
  f32x16 m[4] = {};
  int64_t j = 0;
  for (; j + 64 <= d_in; j += 64)
#pragma GCC unroll 4
    for (int a = 0; a < 4; ++a) {
      i32x16 bits;
      std::memcpy(&bits, w + j + 16 * a, sizeof bits);
      bits &= 0x7fffffff;
      f32x16 v;
      std::memcpy(&v, &bits, sizeof v);
      m[a] = m[a] > v ? m[a] : v;
    }
  f32x16 r = m[0] > m[1] ? m[0] : m[1], r2 = m[2] > m[3] ? m[2] : m[3], h;
  r = r > r2 ? r : r2;
  h = __builtin_shuffle(r, i32x16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  r = r > h ? r : h;
  h = __builtin_shuffle(r, i32x16{4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  r = r > h ? r : h;
  h = __builtin_shuffle(r, i32x16{2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
  r = r > h ? r : h;
  float out = std::max(r[0], r[1]);
  for (; j < d_in; ++j) out = std::max(out, std::fabs(w[j]));
  return out;
}

// Codes of QCH channels (rows of w, d_in apart) for input channels [j0, j0 + QCH), written transposed: input
// channel j0 + jj's QCH codes at out + jj * d_out (one contiguous store each). tile is (QCH channels, QCH inputs).
constexpr int64_t QCH = 16;
#if defined(__x86_64__)
// x86-64: each channel's QCH codes computed as one vector (GCC's vector extensions: the clone's widest vectors,
// narrowed to 16 bytes) and kept in registers, then transposed there: four rounds of byte interleaving (SSE2, in
// every x86-64; row i after a round interleaves rows i / 2 and i / 2 + 8), 64 shuffles. Written to a tile and
// transposed one code at a time, the codes took half the quantizing fold's time (the 16-byte stores were read
// back as wider loads, which no store forwards to).
CRISP_FOLD_MULTIVERSION
static void quantize_tile(const float* w, int64_t d_in, const float* inv, int64_t j0, int8_t* out, int64_t d_out) {
  static_assert(QCH == 16, "one 16-code SSE2 vector a channel");
  typedef int8_t i8x16 __attribute__((vector_size(16)));
  __m128i x[QCH];
  for (int64_t o = 0; o < QCH; ++o) {
    f32x16 v;
    std::memcpy(&v, w + o * d_in + j0, sizeof v);
    v = (v * inv[o] + ROUNDER) - ROUNDER;
    const i8x16 c = __builtin_convertvector(__builtin_convertvector(v, i32x16), i8x16);
    std::memcpy(&x[o], &c, sizeof c);
  }
  for (int round = 0; round < 4; ++round) {
    __m128i y[QCH];
    for (int64_t i = 0; i < QCH / 2; ++i) {
      y[2 * i] = _mm_unpacklo_epi8(x[i], x[i + QCH / 2]);
      y[2 * i + 1] = _mm_unpackhi_epi8(x[i], x[i + QCH / 2]);
    }
    for (int64_t i = 0; i < QCH; ++i) x[i] = y[i];
  }
  for (int64_t jj = 0; jj < QCH; ++jj) _mm_storeu_si128(reinterpret_cast<__m128i*>(out + jj * d_out), x[jj]);
}
#else
CRISP_FOLD_MULTIVERSION
static void quantize_tile(const float* w, int64_t d_in, const float* inv, int64_t j0, int8_t* out, int64_t d_out) {
  int8_t tile[QCH][QCH];
  for (int64_t o = 0; o < QCH; ++o) {
    const float* row = w + o * d_in + j0;
    const float k = inv[o];
    int8_t* t = tile[o];
#pragma omp simd
    for (int64_t jj = 0; jj < QCH; ++jj) {
      t[jj] = static_cast<int8_t>(static_cast<int32_t>((row[jj] * k + ROUNDER) - ROUNDER));
    }
  }
  for (int64_t jj = 0; jj < QCH; ++jj)
    for (int64_t o = 0; o < QCH; ++o) out[jj * d_out + o] = tile[o][jj];
}
#endif

// The same for oc <= QCH channels and any run of input channels (the edges), one code at a time.
static void quantize_edge(const float* w, int64_t d_in, const float* inv, int64_t oc, int64_t j0, int64_t j1,
                          int8_t* out, int64_t d_out) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t o = 0; o < oc; ++o)
      out[(j - j0) * d_out + o] = static_cast<int8_t>(static_cast<int32_t>((w[o * d_in + j] * inv[o] + ROUNDER) - ROUNDER));
}

// Folds a group QCH output channels at a time into a cache-sized float scratch (every layer's channels
// [o0, o0 + oc): n * span * s floats) and hands each layer's block to quantize(i, o0, oc, w), w pointing at channel
// o0's d_in values (the next channels d_in apart): a quantizing fold never writes the float weights to memory.
// The layout the codes go to is the caller's (fold_quant_group below: MatMulInteger's; ExecuTorch's
// crisp::fold_quant_: qlinear.h's packed blocks).
template <typename T, typename Quantize>
inline void fold_channel_blocks(const T* B, int64_t ks, int64_t ts, int64_t u, int64_t r, const float* g, int64_t n,
                                int64_t s, int64_t d_out, int64_t d_in, Quantize&& quantize) {
  const int64_t ncol = n * s, cpad = (ncol + CHUNK - 1) / CHUNK * CHUNK;
  const std::vector<float> mt = mixer_columns(g, n, r, s, cpad);
  const int64_t span = (QCH * d_in + 2 * s - 2) / s + 1;  // product rows a block of channels can touch
  std::vector<float> scratch(static_cast<size_t>(n * span * s));
  std::vector<float*> col(static_cast<size_t>(ncol));
  for (int64_t c = 0; c < ncol; ++c) col[c] = scratch.data() + (c / s) * span * s + c % s;
  for (int64_t o0 = 0; o0 < d_out; o0 += QCH) {
    const int64_t oc = std::min(QCH, d_out - o0);
    const int64_t kb = o0 * d_in / s, ke = std::min(u, ((o0 + oc) * d_in + s - 1) / s);
    fold_rows(B, ks, ts, u, r, mt.data(), col.data(), s, ncol, cpad, kb, ke);
    for (int64_t i = 0; i < n; ++i) quantize(i, o0, oc, scratch.data() + i * span * s + (o0 * d_in - kb * s));
  }
}

// The fold fused with per-channel int8 quantization: every layer's W_i (d_out, d_in) = the row-major reshape of
// B @ G(A_i), quantized symmetric per output channel into codes[i], (d_in, d_out) row-major (W_i^T: the layout
// ONNX Runtime's MatMulInteger takes), and scales[i] (d_out). QCH channels at a time (fold_channel_blocks): their rows of the product
// folded into a float scratch (n * QCH * d_in floats: ViT-S's fc2, n = 4, d_in = 1536, 384 KiB, in cache; never
// the whole float W), then each channel's scale, then the codes QCH x QCH at a time, transposed in registers so
// that every store is QCH contiguous codes. d_out * d_in == u * s; codes in -qmax..qmax (above).
template <typename T>
inline void fold_quant_group(const T* B, int64_t ks, int64_t ts, int64_t u, int64_t r, const float* g, int64_t n,
                             int64_t s, int64_t d_out, int64_t d_in, int8_t* const* codes, float* const* scales,
                             float qmax) {
  float inv[QCH];
  fold_channel_blocks(B, ks, ts, u, r, g, n, s, d_out, d_in, [&](int64_t i, int64_t o0, int64_t oc, const float* w) {
    for (int64_t o = 0; o < oc; ++o) {
      const float m = channel_absmax(w + o * d_in, d_in);
      scales[i][o0 + o] = m > 0.f ? m / qmax : 1.f;
      inv[o] = m > 0.f ? qmax / m : 0.f;
    }
    int8_t* out = codes[i] + o0;
    int64_t j = 0;
    if (oc == QCH)
      for (; j + QCH <= d_in; j += QCH) quantize_tile(w, d_in, inv, j, out + j * d_out, d_out);
    quantize_edge(w, d_in, inv, oc, j, d_in, out + j * d_out, d_out);
  });
}

// Channel-major bases. A transposed basis (r, u) of a group of (d_out, d_in) layers, QCH | d_out and s | d_in, may be
// stored with its columns permuted so that the product rows of QCH output channels at one input position are
// contiguous: column p = (o / QCH) * (d_in / s) * QCH + q * QCH + o % QCH holds product row o * (d_in / s) + q
// (fold_kernel.channel_major writes it). fold_block_t then folds QCH channels' values of inputs [q s, q s + s) at
// once, each column a vector stored as it is (s = CM): every layer's block of channels comes out transposed,
// (d_in, channels), which is ONNX Runtime's int8 layout and a row of ExecuTorch's packed one. Quantizing from there
// needs no transpose and takes each channel's maximum across rows, a vector at a time (the row-major product
// leaves one channel per block of rows: a transpose of every code, then a maximum a channel).
constexpr int64_t CM_GROUP = 4 * QCH;  // channels folded before they are quantized: 64 codes, a cache line, a row

// A float buffer starting on a 64-byte boundary (a cache line), zeroed: std::vector's storage of a large block starts
// 16 bytes past a page (malloc's header), so every 16-float row of the channel-major scratch straddled two lines and
// each of its stores and loads was split in two.
class AlignedFloats {
 public:
  explicit AlignedFloats(size_t n) : buf_(n + 16, 0.f) {
    const auto at = reinterpret_cast<uintptr_t>(buf_.data());
    data_ = buf_.data() + ((64 - at % 64) % 64) / sizeof(float);
  }
  float* data() { return data_; }

 private:
  std::vector<float> buf_;
  float* data_;
};

// Folds CM_GROUP channels at a time (QCH per pass, all of the group's d_in / s input positions) into a scratch
// holding every layer's (d_in, CM_GROUP) block (n * d_in * 64 floats: ViT-S's fc2, 1.5 MiB, in L2), then hands each
// layer's block to quantize(i, o0, oc, w): row j of channels [o0, o0 + oc) at w + j * CM_GROUP (oc a multiple of QCH).
template <typename T, typename Quantize>
inline void fold_channel_major(const T* B, int64_t u, int64_t r, const float* g, int64_t n, int64_t s, int64_t d_out,
                               int64_t d_in, Quantize&& quantize) {
  static_assert(V == QCH, "a pass folds one block of channels");
  const int64_t ncol = n * s, cpad = (ncol + CHUNK - 1) / CHUNK * CHUNK, nq = d_in / s;
  const std::vector<float> mt = mixer_columns(g, n, r, s, cpad);
  AlignedFloats scratch(static_cast<size_t>(n * d_in * CM_GROUP));
  std::vector<float*> col(static_cast<size_t>(ncol));
  for (int64_t o0 = 0; o0 < d_out; o0 += CM_GROUP) {
    const int64_t oc = std::min(CM_GROUP, d_out - o0);
    for (int64_t sb = 0; sb < oc; sb += QCH) {
      for (int64_t c = 0; c < ncol; ++c)  // layer c / s, input q s + c % s: row c % s of the pass' s rows
        col[c] = scratch.data() + (c / s) * d_in * CM_GROUP + (c % s) * CM_GROUP + sb;
      const int64_t p0 = (o0 + sb) * nq;
      for (int64_t q = 0; q < nq; ++q)
        fold_block_t(B + p0 + q * QCH, u, mt.data(), col.data(), p0 + q * QCH, q * s * CM_GROUP, u, r, CM, ncol, cpad);
    }
    for (int64_t i = 0; i < n; ++i) quantize(i, o0, oc, scratch.data() + i * d_in * CM_GROUP);
  }
}

// QCH channels' scales from their maxima mx: max / qmax (1 for an all-zero channel) into scales, qmax / max (0 for
// an all-zero one) into inv, as fold_quant_group's.
__attribute__((always_inline)) inline void scales_from_maxima(const float* mx, float qmax, float* scales, float* inv) {
  for (int64_t q = 0; q < QCH; ++q) {
    scales[q] = mx[q] > 0.f ? mx[q] / qmax : 1.f;
    inv[q] = mx[q] > 0.f ? qmax / mx[q] : 0.f;
  }
}

// Per-channel scales of a (d_in, CM_GROUP) block's QCH channels starting at column sb (the maximum of each
// column), into scales[0, QCH), and inv (scales_from_maxima).
__attribute__((always_inline)) inline void column_scales(const float* w, int64_t d_in, int64_t sb, float qmax,
                                                         float* scales, float* inv) {
  f32x16 m = {};
  for (int64_t j = 0; j < d_in; ++j) {
    i32x16 bits;
    std::memcpy(&bits, w + j * CM_GROUP + sb, sizeof bits);
    bits &= 0x7fffffff;
    f32x16 v;
    std::memcpy(&v, &bits, sizeof v);
    m = m > v ? m : v;
  }
  float mx[QCH];
  std::memcpy(mx, &m, sizeof mx);
  scales_from_maxima(mx, qmax, scales, inv);
}

// ONNX Runtime's layout from a channel-major block: codes (d_in, d_out), out pointing at column o0; QCH codes of a
// row a store.
CRISP_FOLD_MULTIVERSION
static void quantize_cm(const float* w, int64_t d_in, int64_t oc, int8_t* out, int64_t d_out, float* scales,
                        float qmax) {
  typedef int8_t i8x16 __attribute__((vector_size(16)));
  for (int64_t sb = 0; sb < oc; sb += QCH) {
    f32x16 inv;
    column_scales(w, d_in, sb, qmax, scales + sb, reinterpret_cast<float*>(&inv));
    for (int64_t j = 0; j < d_in; ++j) {
      f32x16 v;
      std::memcpy(&v, w + j * CM_GROUP + sb, sizeof v);
      v = (v * inv + ROUNDER) - ROUNDER;
      const i8x16 c = __builtin_convertvector(__builtin_convertvector(v, i32x16), i8x16);
      std::memcpy(out + j * d_out + sb, &c, sizeof c);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The maxima of |w| down the first nb * QCH columns (nb <= 4) of a channel-major block (rows CM_GROUP floats apart)
// into mx, with AVX-512: two rows a step, 2 nb independent maxima (column_scales' one chain a block of QCH channels
// waited on each maximum's latency, row after row: 40% of the channel-major quantization's time, measured with perf).
// quantize_cm_stream's and ExecuTorch's quantize_pack_cm_avx512's (export/executorch/kernels/fold_quant.cpp) maxima.
__attribute__((target("avx512f"))) inline void block_absmax_avx512(const float* w, int64_t d_in, int64_t nb, float* mx) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 m[2][4] = {{zero, zero, zero, zero}, {zero, zero, zero, zero}};
  int64_t j = 0;
  for (; j + 2 <= d_in; j += 2)
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t a = 0; a < nb; ++a)
        m[h][a] = _mm512_max_ps(m[h][a], _mm512_abs_ps(_mm512_loadu_ps(w + (j + h) * CM_GROUP + a * QCH)));
  for (; j < d_in; ++j)
    for (int64_t a = 0; a < nb; ++a)
      m[0][a] = _mm512_max_ps(m[0][a], _mm512_abs_ps(_mm512_loadu_ps(w + j * CM_GROUP + a * QCH)));
  for (int64_t a = 0; a < nb; ++a) _mm512_storeu_ps(mx + a * QCH, _mm512_max_ps(m[0][a], m[1][a]));
}

// The maxima of |w| down QCH columns [sb, sb + QCH) of a channel-major block (rows CM_GROUP floats apart) into
// mx, with AVX2 (two rows a step: four independent maxima): quantize_cm_avx2's and ExecuTorch's
// quantize_pack_cm_avx2's (export/executorch/kernels/fold_quant.cpp) channel maxima.
__attribute__((target("avx2"))) inline void column_absmax_avx2(const float* w, int64_t d_in, int64_t sb, float* mx) {
  const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t j = 0;
  for (; j + 2 <= d_in; j += 2)
    for (int a = 0; a < 4; ++a)
      m[a] = _mm256_max_ps(m[a], _mm256_and_ps(_mm256_loadu_ps(w + (j + a / 2) * CM_GROUP + sb + (a % 2) * 8), abs));
  for (; j < d_in; ++j)
    for (int a = 0; a < 2; ++a) m[a] = _mm256_max_ps(m[a], _mm256_and_ps(_mm256_loadu_ps(w + j * CM_GROUP + sb + a * 8), abs));
  _mm256_storeu_ps(mx, _mm256_max_ps(m[0], m[2]));
  _mm256_storeu_ps(mx + 8, _mm256_max_ps(m[1], m[3]));
}
#endif

#ifdef CRISP_FOLD_AVX512_CODES
// The same for a whole group of CM_GROUP channels whose rows are 64-byte aligned, with AVX-512: each row's 64 codes
// one non-temporal store (a whole cache line: written without first reading the line the store replaces, a third of
// the memory traffic of a switch whose codes are not in cache).
__attribute__((target("avx512f,avx512bw"))) static void quantize_cm_stream(const float* w, int64_t d_in, int8_t* out,
                                                                           int64_t d_out, float* scales, float qmax) {
  alignas(64) float mx[CM_GROUP];
  __m512 inv[4];
  block_absmax_avx512(w, d_in, 4, mx);
  for (int64_t a = 0; a < 4; ++a)
    scales_from_maxima(mx + a * QCH, qmax, scales + a * QCH, reinterpret_cast<float*>(&inv[a]));
  const __m512 rounder = _mm512_set1_ps(ROUNDER);
  for (int64_t j = 0; j < d_in; ++j) {
    __m128i c[4];
    for (int64_t a = 0; a < 4; ++a)  // (w * inv + ROUNDER) - ROUNDER, as quantize_cm's AVX-512 clone computes it
      c[a] = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_sub_ps(
          _mm512_fmadd_ps(_mm512_loadu_ps(w + j * CM_GROUP + a * QCH), inv[a], rounder), rounder)));
    const __m512i line = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(
        _mm512_castsi128_si512(c[0]), c[1], 1), c[2], 2), c[3], 3);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j * d_out), line);
  }
}
#endif

#ifdef CRISP_FOLD_AVX512_CODES
// quantize_cm with AVX2 (a CPU without AVX-512): the same arithmetic (one FMA, as the x86-64-v3 clone contracts it),
// each row's 16 codes narrowed by two packs and a lane permute, and the channels' maxima as AVX2 vectors: GCC
// lowers column_scales' and the narrowing's 16-lane vector extensions poorly without AVX-512 (60 cycles a row of
// maxima; the codes one at a time), which took most of a switch (ViT-S's fc1 group: 2.3 ms of quantization alone).
__attribute__((target("avx2,fma"))) static void quantize_cm_avx2(const float* w, int64_t d_in, int64_t oc, int8_t* out,
                                                                 int64_t d_out, float* scales, float qmax) {
  const __m256 rounder = _mm256_set1_ps(ROUNDER);
  for (int64_t sb = 0; sb < oc; sb += QCH) {
    alignas(64) float mx[QCH], inv[QCH];
    column_absmax_avx2(w, d_in, sb, mx);
    scales_from_maxima(mx, qmax, scales + sb, inv);
    const __m256 inv0 = _mm256_load_ps(inv), inv1 = _mm256_load_ps(inv + 8);
    for (int64_t j = 0; j < d_in; ++j) {
      const float* row = w + j * CM_GROUP + sb;
      const __m256i c0 = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_fmadd_ps(_mm256_loadu_ps(row), inv0, rounder), rounder));
      const __m256i c1 = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_fmadd_ps(_mm256_loadu_ps(row + 8), inv1, rounder),
                                                           rounder));
      const __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0xD8);  // 16 int16 in order
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j * d_out + sb),
                       _mm_packs_epi16(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
  }
}
#endif

// fold_quant_group for a channel-major basis (T float or int8 codes): the same codes and scales.
template <typename T>
inline void fold_quant_group_cm(const T* B, int64_t u, int64_t r, const float* g, int64_t n, int64_t s, int64_t d_out,
                                int64_t d_in, int8_t* const* codes, float* const* scales, float qmax) {
#ifdef CRISP_FOLD_AVX512_CODES
  static const bool avx512bw = __builtin_cpu_supports("avx512bw");
  bool streamed = false;
#endif
  fold_channel_major(B, u, r, g, n, s, d_out, d_in, [&](int64_t i, int64_t o0, int64_t oc, const float* w) {
#ifdef CRISP_FOLD_AVX512_CODES
    if (avx512bw && oc == CM_GROUP && d_out % CM_GROUP == 0 && reinterpret_cast<uintptr_t>(codes[i]) % 64 == 0) {
      quantize_cm_stream(w, d_in, codes[i] + o0, d_out, scales[i] + o0, qmax);
      streamed = true;
      return;
    }
    if (simd_path() == SimdPath::avx2) return quantize_cm_avx2(w, d_in, oc, codes[i] + o0, d_out, scales[i] + o0, qmax);
#endif
    quantize_cm(w, d_in, oc, codes[i] + o0, d_out, scales[i] + o0, qmax);
  });
#ifdef CRISP_FOLD_AVX512_CODES
  if (streamed) _mm_sfence();  // the streamed lines visible to the threads that read the codes next (ORT's)
#endif
}

}  // namespace crisp_fold
