// The portable paths of crisp::qlinear and crisp::fold_quant_ (what an aarch64 build runs) against their x86-64
// paths this machine has (AVX-512 VNNI; AVX2, qlinear's on CPUs without AVX-512) on the same data, sizes with every
// tail: prints "ok" or what differs.
// Built and run by test_qlinear_kernel.py (the kernels' sources included: their functions are file-local).
#include "../../export/executorch/kernels/fold_quant.cpp"
#include "../../export/executorch/kernels/qlinear.cpp"

#include <cstdio>
#include <random>

int main() {
  const bool avx512 = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (!avx512 && !avx2) {
    std::printf("no-simd\n");
    return 0;
  }
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  const int64_t sizes[][3] = {{197, 384, 1152}, {13, 37, 21}, {9, 6, 50}, {1, 1, 1}, {7, 130, 33}, {8, 1536, 48}};
  for (const auto& sz : sizes) {
    const int64_t m = sz[0], k = sz[1], n = sz[2], kp = (k + 3) / 4 * 4;
    std::vector<float> X(m * k), W(n * k), bias(n), y1(m * n), y2(m * n);
    for (auto& v : X) v = nd(rng) * 2.f + 0.3f;
    for (auto& v : W) v = nd(rng);
    for (auto& v : bias) v = nd(rng);
    std::vector<int8_t> b1(crisp_q::buffer_bytes(n, k), 7), b2(crisp_q::buffer_bytes(n, k), 7);
    float* s1 = reinterpret_cast<float*>(b1.data() + crisp_q::codes_bytes(n, k));
    float* s2 = reinterpret_cast<float*>(b2.data() + crisp_q::codes_bytes(n, k));
    for (int64_t o = 0; o < n; ++o) {
      const int64_t blk = (o / kBlock) * (kp / kGroup) * kGroupStride + (o % kBlock) * kGroup;
      s1[o] = quantize_row_portable(W.data() + o * k, k, b1.data() + blk, reinterpret_cast<int32_t*>(s1 + n)[o]);
      s2[o] = avx512 ? quantize_row_avx512(W.data() + o * k, k, b2.data() + blk, reinterpret_cast<int32_t*>(s2 + n)[o])
                     : quantize_row_portable(W.data() + o * k, k, b2.data() + blk, reinterpret_cast<int32_t*>(s2 + n)[o]);
    }
    // the lanes past n (never written here) hold the same 7s in both: only written bytes can differ
    if (b1 != b2) {
      std::printf("quantize differs at %ld x %ld\n", n, k);
      return 1;
    }
    QRows q1, q2, q3;
    quantize_rows_portable_sized(X.data(), m, k, kp, q1);
    quantize_rows(X.data(), m, k, kp, q2);  // the path this CPU picks
    size_rows(m, kp, q3);
    if (avx2) quantize_rows_avx2(X.data(), m, k, kp, q3);
    if (q1.codes != q2.codes || q1.scale != q2.scale || q1.zero != q2.zero ||
        (avx2 && (q1.codes != q3.codes || q1.scale != q3.scale || q1.zero != q3.zero))) {
      std::printf("activation quantization differs at %ld x %ld\n", m, k);
      return 1;
    }
    for (int64_t o = n; o < (n + 15) / 16 * 16; ++o)  // padding lanes: zero, as fold_quant_ leaves them
      for (int64_t g = 0; g < kp / kGroup; ++g)
        std::memset(b1.data() + (o / kBlock * (kp / kGroup) + g) * kGroupStride + (o % kBlock) * kGroup, 0, 4);
    gemm_portable(q1, b1.data(), s1, reinterpret_cast<int32_t*>(s1 + n), bias.data(), y1.data(), m, n, kp);
    for (const Gemm simd : {avx512 ? gemm_avx512vnni : nullptr, avx2 ? gemm_avx2 : nullptr}) {
      if (!simd) continue;
      std::fill(y2.begin(), y2.end(), -1e30f);
      simd(q1, b1.data(), s1, reinterpret_cast<int32_t*>(s1 + n), bias.data(), y2.data(), m, n, kp);
      for (int64_t i = 0; i < m * n; ++i)
        if (std::fabs(y1[i] - y2[i]) > 1e-4f * (1.f + std::fabs(y1[i]))) {
          std::printf("gemm (%s) differs at %ld x %ld -> %ld, element %ld: %g vs %g\n",
                      simd == gemm_avx2 ? "avx2" : "avx512", m, k, n, i, y1[i], y2[i]);
          return 1;
        }
    }
  }

  // a channel-major block (fold_core.h: row j of oc channels, CM_GROUP floats apart) into the packed layout
  const int64_t blocks[][2] = {{36, 64}, {10, 32}, {7, 16}, {384, 64}};  // (k, oc): k % 4 = 2 and 3 among them
  for (const auto& bk : blocks) {
    const int64_t k = bk[0], oc = bk[1], n = 80, o0 = 16;  // channels [16, 16 + oc) of an 80-channel layer
    std::vector<float> blk(k * crisp_fold::CM_GROUP);
    for (auto& v : blk) v = nd(rng);
    std::vector<int8_t> b1(crisp_q::buffer_bytes(n, k), 7), b2(crisp_q::buffer_bytes(n, k), 7);
    quantize_pack_cm(blk.data(), o0, oc, n, k, b1.data());
    std::vector<int8_t> b3 = b2;
    if (avx512) quantize_pack_cm_avx512(blk.data(), o0, oc, n, k, b2.data());
    if (avx2) quantize_pack_cm_avx2(blk.data(), o0, oc, n, k, b3.data());
    if ((avx512 && b1 != b2) || (avx2 && b1 != b3)) {
      std::printf("channel-major quantize differs at k = %ld, oc = %ld\n", k, oc);
      return 1;
    }
  }
  std::printf("ok\n");
  return 0;
}
