// The fused CRISP fold (fold_core.h) behind a plain C entry point, for callers without ExecuTorch: ONNX
// Runtime's Python session (export/fold_kernel.py builds this file alone into libcrisp_fold.so and calls it
// with ctypes). No ExecuTorch headers here.
#include "fold_core.h"

// Both fold_quant entry points: the size checks, then fold_core.h's fold_quant_group for a float or an int8 basis.
template <typename T>
static int fold_quant(const T* basis, int64_t u, int64_t r, int transposed, const float* mixers, int64_t n, int64_t s,
                      int64_t d_out, int64_t d_in, int8_t* const* codes, float* const* scales, int qmax) {
  if (u <= 0 || r <= 0 || n <= 0 || s <= 0 || d_out <= 0 || d_in <= 0 || d_out * d_in != u * s || !basis ||
      !mixers || !codes || !scales || transposed < 0 || transposed > 2 || qmax < 1 || qmax > 127)
    return 1;
  if (transposed == 2) {  // channel-major (fold_core.h)
    if (d_out % crisp_fold::QCH != 0 || d_in % s != 0) return 1;
    crisp_fold::fold_quant_group_cm(basis, u, r, mixers, n, s, d_out, d_in, codes, scales, static_cast<float>(qmax));
    return 0;
  }
  crisp_fold::fold_quant_group(basis, transposed ? 1 : r, transposed ? u : 1, u, r, mixers, n, s, d_out, d_in, codes,
                               scales, static_cast<float>(qmax));
  return 0;
}

extern "C" {

// One group: basis (u, r) row-major (transposed = 0) or stored transposed, (r, u) (transposed = 1); mixers
// (n, r, s) already gated; outs[i] (u, s) row-major, layer i's product. Returns 0, or 1 for sizes it refuses.
int crisp_fold_group(const float* basis, int64_t u, int64_t r, int transposed, const float* mixers, int64_t n,
                     int64_t s, float* const* outs) {
  if (u <= 0 || r <= 0 || n <= 0 || s <= 0 || !basis || !mixers || !outs) return 1;
  crisp_fold::fold_group(basis, transposed ? 1 : r, transposed ? u : 1, u, r, mixers, n, s, outs);
  return 0;
}

// The same group folded and quantized per output channel (fold_core.h's fold_quant_group): codes[i] (d_in, d_out)
// int8 row-major in -qmax..qmax (1..127), scales[i] (d_out). transposed = 2: the basis stored transposed and
// channel-major (fold_core.h's fold_quant_group_cm; 16 | d_out, s | d_in). Returns 0, or 1 for arguments it refuses
// (d_out * d_in != u * s, qmax outside 1..127).
int crisp_fold_quant_group(const float* basis, int64_t u, int64_t r, int transposed, const float* mixers, int64_t n,
                           int64_t s, int64_t d_out, int64_t d_in, int8_t* const* codes, float* const* scales,
                           int qmax) {
  return fold_quant(basis, u, r, transposed, mixers, n, s, d_out, d_in, codes, scales, qmax);
}

// The same with an int8 basis (its codes; the caller multiplies each term's scale into the mixers).
int crisp_fold_quant_group_i8(const int8_t* basis, int64_t u, int64_t r, int transposed, const float* mixers,
                              int64_t n, int64_t s, int64_t d_out, int64_t d_in, int8_t* const* codes,
                              float* const* scales, int qmax) {
  return fold_quant(basis, u, r, transposed, mixers, n, s, d_out, d_in, codes, scales, qmax);
}

}  // extern "C"
