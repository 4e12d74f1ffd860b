// crisp::fold_(Tensor(a!)[] self, Tensor basis, Tensor mixers) -> (): a swappable bundle's set_task for one
// CRISP group in one call. self holds the group's n layers' dense weights (each u * s floats: the row-major
// (d_out, d_in) reshape of the layer's (u, s) product); basis is the group's B (u, r); mixers the gated
// mixers G(A_i) stacked (n, r, s). It writes W_i = reshape(B @ G(A_i)) straight into self[i] (the program's
// mutable buffers): the basis is read once for all the group's layers, and nothing is copied afterwards.
//
// Per ROWS rows of B: the n * s product columns of every layer at once, sums over the r terms (the mixers laid
// out column-wise, zero-padded to CHUNK columns so the sums stay in registers), then each layer's s values of
// each row stored where its W wants them (with s = 4, one 4-float store). Each output is the same sum as torch's B @ G(A_i)
// (float32, terms in order t = 0..r-1), so the weights agree with the PyTorch fold to rounding.
#include <algorithm>
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
constexpr int64_t ROWS = 4;     // rows of the product per pass: independent sums, and the mixers loaded once for them

// Rows [k, k + rows) of the product from b (ROWS rows of B, r each, zero past `rows`): ROWS independent sums
// per column (one sum alone would wait on each multiply-add's latency), the mixers loaded once for ROWS rows.
// mt: (r, cpad) the mixers column-wise, column c = layer c / s's column c % s, zero past ncol = n * s; col[c]:
// where column c's value of row 0 goes (layer c / s's W + c % s; row k's is k * s further).
CRISP_MULTIVERSION
void fold_block(const float* b, const float* mt, float* const* col, int64_t k, int64_t rows, int64_t r, int64_t s,
                int64_t ncol, int64_t cpad) {
  for (int64_t c0 = 0; c0 < cpad; c0 += CHUNK) {
    float acc[ROWS][CHUNK] = {};
    for (int64_t t = 0; t < r; ++t) {
      const float* m = mt + t * cpad + c0;
#pragma GCC unroll 4  // ROWS: unrolled also at -O2 (the runners' builds), so the sums stay in registers
      for (int64_t q = 0; q < ROWS; ++q) {
        const float bt = b[q * r + t];
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
  const int64_t cpad = (n * s + CHUNK - 1) / CHUNK * CHUNK;
  std::vector<float*> col(static_cast<size_t>(n * s));
  for (int64_t i = 0; i < n; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, ws[i].scalar_type() == ScalarType::Float && ws[i].numel() == u * s, InvalidArgument, ,
                        "crisp::fold_: a weight is not float32 with u * s elements");
    for (int64_t j = 0; j < s; ++j) col[i * s + j] = ws[i].mutable_data_ptr<float>() + j;
  }
  std::vector<float> mt(static_cast<size_t>(r * cpad), 0.f);
  const float* g = mixers.const_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < r; ++t)
      for (int64_t j = 0; j < s; ++j) mt[t * cpad + i * s + j] = g[(i * r + t) * s + j];
  const float* B = basis.const_data_ptr<float>();
  int64_t k = 0;
  for (; k + ROWS <= u; k += ROWS) fold_block(B + k * r, mt.data(), col.data(), k, ROWS, r, s, n * s, cpad);
  if (k < u) {  // the last u % ROWS rows, zero-padded
    std::vector<float> tail(static_cast<size_t>(ROWS * r), 0.f);
    std::copy(B + k * r, B + u * r, tail.begin());
    fold_block(tail.data(), mt.data(), col.data(), k, u - k, r, s, n * s, cpad);
  }
}

// A boxed kernel: the unboxing helper (EXECUTORCH_LIBRARY) wants exactly one output tensor, and this op's
// outputs are the tensors of its list argument.
const auto registered = executorch::runtime::register_kernel(executorch::runtime::Kernel("crisp::fold_", fold_));

}  // namespace
