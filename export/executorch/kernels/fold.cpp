// crisp::fold_(Tensor(a!)[] self, Tensor basis, Tensor mixers) -> (): a swappable bundle's set_task for one
// CRISP group in one call. self holds the group's n layers' dense weights (each u * s floats: the row-major
// (d_out, d_in) reshape of the layer's (u, s) product); basis is the group's B (u, r); mixers the gated
// mixers G(A_i) stacked (n, r, s). It writes W_i = reshape(B @ G(A_i)) straight into self[i] (the program's
// mutable buffers): the basis is read once for all the group's layers, and nothing is copied afterwards.
//
// Per row k of B: the n * s product columns of every layer at once, C = n * s accumulators over the r terms
// (mixers laid out column-wise, zero-padded to CHUNK columns so the accumulators stay in registers), then
// each layer's s values stored where its W wants them. Each output is the same sum as torch's B @ G(A_i)
// (float32, terms in order t = 0..r-1), so the weights agree with the PyTorch fold to rounding.
#include <algorithm>
#include <cstring>
#include <vector>

#include "crisp_kernels.h"

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

namespace {

constexpr int64_t CHUNK = 16;  // product columns per pass: one AVX-512 vector, two AVX2 / four NEON vectors

// mt: (r, cpad) the mixers column-wise, column c = layer c / s's column c % s, zero past n * s.
CRISP_MULTIVERSION
void fold_rows(const float* B, const float* mt, float* const* outs, int64_t u, int64_t r, int64_t s, int64_t n,
               int64_t cpad) {
  float acc[CHUNK];
  for (int64_t k = 0; k < u; ++k) {
    const float* b = B + k * r;
    for (int64_t c0 = 0; c0 < cpad; c0 += CHUNK) {
#pragma omp simd
      for (int64_t c = 0; c < CHUNK; ++c) acc[c] = 0.f;
      for (int64_t t = 0; t < r; ++t) {
        const float bt = b[t];
        const float* m = mt + t * cpad + c0;
#pragma omp simd
        for (int64_t c = 0; c < CHUNK; ++c) acc[c] += bt * m[c];
      }
      // this chunk's columns: layers [c0 / s, ...), each layer's s values contiguous in its W (row k)
      for (int64_t c = c0; c < std::min(c0 + CHUNK, n * s);) {
        const int64_t i = c / s, j = c % s, len = std::min(s - j, c0 + CHUNK - c);
        std::memcpy(outs[i] + k * s + j, acc + (c - c0), sizeof(float) * len);
        c += len;
      }
    }
  }
}

void fold_(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  // stack: self (tensor list), basis, mixers[, the empty list the emitter gives an op returning ()]
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 3 && stack[0]->isTensorList() && stack[1]->isTensor() &&
                      stack[2]->isTensor(), InvalidArgument, , "crisp::fold_(Tensor[] self, Tensor basis, Tensor mixers)");
  ArrayRef<Tensor> ws = stack[0]->toTensorList();
  const Tensor& basis = stack[1]->toTensor();
  const Tensor& mixers = stack[2]->toTensor();
  ET_KERNEL_CHECK_MSG(ctx, basis.dim() == 2 && mixers.dim() == 3, InvalidArgument, ,
                      "crisp::fold_: basis is (u, r), mixers (n, r, s)");
  const int64_t u = basis.size(0), r = basis.size(1), n = mixers.size(0), s = mixers.size(2);
  ET_KERNEL_CHECK_MSG(ctx, mixers.size(1) == r && static_cast<int64_t>(ws.size()) == n, InvalidArgument, ,
                      "crisp::fold_: mixers (n, r, s) do not match the basis' r or the n weights");
  ET_KERNEL_CHECK_MSG(ctx, basis.scalar_type() == ScalarType::Float && mixers.scalar_type() == ScalarType::Float,
                      InvalidArgument, , "crisp::fold_: float32 only");
  std::vector<float*> outs(n);
  for (int64_t i = 0; i < n; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, ws[i].scalar_type() == ScalarType::Float && ws[i].numel() == u * s, InvalidArgument, ,
                        "crisp::fold_: a weight is not float32 with u * s elements");
    outs[i] = ws[i].mutable_data_ptr<float>();
  }
  const int64_t cpad = (n * s + CHUNK - 1) / CHUNK * CHUNK;
  std::vector<float> mt(static_cast<size_t>(r * cpad), 0.f);
  const float* g = mixers.const_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < r; ++t)
      for (int64_t j = 0; j < s; ++j) mt[t * cpad + i * s + j] = g[(i * r + t) * s + j];
  fold_rows(basis.const_data_ptr<float>(), mt.data(), outs.data(), u, r, s, n, cpad);
}

// A boxed kernel: the unboxing helper (EXECUTORCH_LIBRARY) wants exactly one output tensor, and this op's
// outputs are the tensors of its list argument.
const auto registered = executorch::runtime::register_kernel(executorch::runtime::Kernel("crisp::fold_", fold_));

}  // namespace
