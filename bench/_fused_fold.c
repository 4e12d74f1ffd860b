#include <immintrin.h>
#include <stddef.h>
/* A fold kernel no runtime has, for bench_fold_layouts.py --fused-kernel: what a fold costs when one pass
   reads the basis once and writes every layer's W in the forward's layout, the product transposed in
   registers as it is computed (AVX-512; a probe, not part of crisp-edge).

   One group: bt (r, u) row-major (the basis transposed, as fold.onnx stores it), g (n, r, s) the gated
   mixers, out[i] (u, s) row-major = layer i's W. r = 16, s = 4, n = 4 (ViT-S at full capacity); u % 16 == 0.
   Per 16 rows of W: 16 accumulators (n layers x s columns, 16 rows each), then each layer's 4 vectors
   interleaved into 64 contiguous floats. */
void fold_group(const float* bt, const float* g, float** out, size_t u) {
    const int r = 16, s = 4, n = 4;
    for (size_t k = 0; k < u; k += 16) {
        __m512 acc[16];
        for (int q = 0; q < 16; q++) acc[q] = _mm512_setzero_ps();
        for (int t = 0; t < r; t++) {
            __m512 b = _mm512_loadu_ps(bt + (size_t)t * u + k);
            for (int i = 0; i < n; i++)
                for (int j = 0; j < s; j++)
                    acc[i * s + j] = _mm512_fmadd_ps(b, _mm512_set1_ps(g[(i * r + t) * s + j]), acc[i * s + j]);
        }
        for (int i = 0; i < n; i++) {
            /* acc[i*s+j][l] = W_i[k+l, j]: write 16 rows of 4 -> 64 contiguous floats, interleaving the 4 vectors */
            __m512 a0 = acc[i*s+0], a1 = acc[i*s+1], a2 = acc[i*s+2], a3 = acc[i*s+3];
            __m512 t0 = _mm512_unpacklo_ps(a0, a1), t1 = _mm512_unpackhi_ps(a0, a1);
            __m512 t2 = _mm512_unpacklo_ps(a2, a3), t3 = _mm512_unpackhi_ps(a2, a3);
            __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
            __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
            __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
            __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
            /* each u_m holds, per 128-bit lane L, row (4L + m) as [j0 j1 j2 j3] */
            float* o = out[i] + k * s;
            __m512 lo01 = _mm512_shuffle_f32x4(u0, u1, 0x44), hi01 = _mm512_shuffle_f32x4(u0, u1, 0xEE);
            __m512 lo23 = _mm512_shuffle_f32x4(u2, u3, 0x44), hi23 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
            /* lo01 holds rows 0 4 1 5 (128-bit lanes), lo23 rows 2 6 3 7; hi01 / hi23 the same + 8 */
            __m512 r0 = _mm512_shuffle_f32x4(lo01, lo23, 0x88); /* u0.L0 u1.L0 u2.L0 u3.L0 = rows 0 1 2 3 */
            __m512 r1 = _mm512_shuffle_f32x4(lo01, lo23, 0xDD); /* u0.L1 u1.L1 u2.L1 u3.L1 = rows 4 5 6 7 */
            __m512 r2 = _mm512_shuffle_f32x4(hi01, hi23, 0x88); /* rows 8..11 */
            __m512 r3 = _mm512_shuffle_f32x4(hi01, hi23, 0xDD); /* rows 12..15 */
            _mm512_storeu_ps(o, r0); _mm512_storeu_ps(o + 16, r1); _mm512_storeu_ps(o + 32, r2); _mm512_storeu_ps(o + 48, r3);
        }
    }
}
