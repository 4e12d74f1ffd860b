// crisp::rowmajor_linear.out(x, w, *, out): out[..., o] = sum_i x[..., i] * w[o, i], with w read in place in
// its row-major (d_out, d_in) layout: no packing, so a weight that changes between calls (a swappable
// bundle's mutable buffer, rewritten by set_task) costs no more than a constant one. XNNPACK packs a
// non-constant weight on every call, which at one token per step costs about twice the product.
// Made for few rows (a language model's decode step); many rows (prefill, a ViT's tokens) stay with
// XNNPACK, whose packing is then amortised.
#include "crisp_kernels.h"

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

namespace {

CRISP_MULTIVERSION
void rows_times_weight(const float* X, const float* W, float* Y, int64_t m, int64_t din, int64_t dout) {
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = X + r * din;
    float* yr = Y + r * dout;
    int64_t o = 0;
    for (; o + 4 <= dout; o += 4) {  // four rows of w per pass: x is loaded once for four dot products
      const float *w0 = W + o * din, *w1 = w0 + din, *w2 = w1 + din, *w3 = w2 + din;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t i = 0; i < din; ++i) {
        const float xv = xr[i];
        a0 += w0[i] * xv;
        a1 += w1[i] * xv;
        a2 += w2[i] * xv;
        a3 += w3[i] * xv;
      }
      yr[o] = a0;
      yr[o + 1] = a1;
      yr[o + 2] = a2;
      yr[o + 3] = a3;
    }
    for (; o < dout; ++o) {
      const float* wo = W + o * din;
      float a = 0.f;
#pragma omp simd reduction(+ : a)
      for (int64_t i = 0; i < din; ++i) a += wo[i] * xr[i];
      yr[o] = a;
    }
  }
}

Tensor& rowmajor_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& w, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, w.dim() == 2 && x.dim() >= 1 && x.size(x.dim() - 1) == w.size(1),
                      InvalidArgument, out, "crisp::rowmajor_linear: x (..., d_in) and w (d_out, d_in) do not agree");
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && w.scalar_type() == ScalarType::Float &&
                      out.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "crisp::rowmajor_linear: float32 only");
  const int64_t din = w.size(1), dout = w.size(0), m = x.numel() / din;
  ET_KERNEL_CHECK_MSG(ctx, out.numel() == m * dout, InvalidArgument, out,
                      "crisp::rowmajor_linear: out has the wrong number of elements");
  rows_times_weight(x.const_data_ptr<float>(), w.const_data_ptr<float>(), out.mutable_data_ptr<float>(), m, din, dout);
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(crisp, "rowmajor_linear.out", rowmajor_linear_out);
