// crisp::fold_quant_(Tensor(a!)[] self, Tensor basis, Tensor mixers, int d_in) -> (): an int8 swappable bundle's
// set_task for one CRISP group in one call. As crisp::fold_ (fold.cpp: W_i = reshape(B @ G(A_i)), the basis read
// once for the group's n layers, export/kernels/fold_core.h's arithmetic), but the product is folded 16 output
// rows at a time into a small float scratch (every layer's 16 rows: n * 16 * d_in floats, cache-sized) and each
// block is quantized per output channel into the layer's packed int8 buffer (qlinear.h: codes, scales, column
// sums) straight away: no float copy of the weights, and no packing left for forward (crisp::qlinear reads the
// buffers in place). The codes equal custom_ops.quantize_weight of the float weights crisp::fold_ writes.
#include <algorithm>
#include <vector>

#include "../../kernels/fold_core.h"
#include "crisp_kernels.h"
#include "qlinear.h"

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

namespace {

void fold_quant_(KernelRuntimeContext& ctx, Span<EValue*> stack) {
  // stack: self (tensor list), basis, mixers, d_in[, the empty list the emitter gives an op returning ()]
  ET_KERNEL_CHECK_MSG(ctx, stack.size() >= 4 && stack[0]->isTensorList() && stack[1]->isTensor() &&
                      stack[2]->isTensor() && stack[3]->isInt(), InvalidArgument, ,
                      "crisp::fold_quant_(Tensor[] self, Tensor basis, Tensor mixers, int d_in)");
  ArrayRef<Tensor> ws = stack[0]->toTensorList();
  const Tensor& basis = stack[1]->toTensor();
  const Tensor& mixers = stack[2]->toTensor();
  const int64_t d_in = stack[3]->toInt();
  ET_KERNEL_CHECK_MSG(ctx, basis.dim() == 2 && mixers.dim() == 3 && basis.scalar_type() == ScalarType::Float &&
                      mixers.scalar_type() == ScalarType::Float, InvalidArgument, ,
                      "crisp::fold_quant_: basis (u, r) and mixers (n, r, s), float32");
  const int64_t u = basis.size(0), r = basis.size(1), n = mixers.size(0), s = mixers.size(2);
  ET_KERNEL_CHECK_MSG(ctx, mixers.size(1) == r && static_cast<int64_t>(ws.size()) == n && d_in > 0 &&
                      (u * s) % d_in == 0, InvalidArgument, ,
                      "crisp::fold_quant_: mixers (n, r, s), n buffers and d_in do not match the basis");
  const int64_t d_out = u * s / d_in;
  std::vector<int8_t*> bufs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, ws[i].scalar_type() == ScalarType::Char &&
                        ws[i].numel() == crisp_q::buffer_bytes(d_out, d_in), InvalidArgument, ,
                        "crisp::fold_quant_: a buffer is not int8 of qlinear.h's size for (d_out, d_in)");
    bufs[i] = ws[i].mutable_data_ptr<int8_t>();
  }
  // Output rows per pass: whole packed blocks whose product rows are whole (rows * d_in a multiple of s).
  int64_t ob = crisp_q::kBlock;
  while ((ob * d_in) % s) ob += crisp_q::kBlock;
  std::vector<float> scratch(static_cast<size_t>(n * ob * d_in));
  std::vector<float*> outs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) outs[i] = scratch.data() + i * ob * d_in;
  const float* B = basis.const_data_ptr<float>();
  const float* g = mixers.const_data_ptr<float>();
  for (int64_t o0 = 0; o0 < d_out; o0 += ob) {
    const int64_t rows = std::min(ob, d_out - o0);
    crisp_fold::fold_group(B + (o0 * d_in / s) * r, r, 1, rows * d_in / s, r, g, n, s, outs.data());
    for (int64_t i = 0; i < n; ++i) crisp_q::quantize_pack_rows(outs[i], o0, rows, d_out, d_in, bufs[i]);
  }
  const int64_t groups = (d_in + crisp_q::kGroup - 1) / crisp_q::kGroup, pad = (d_out + crisp_q::kBlock - 1) /
                         crisp_q::kBlock * crisp_q::kBlock;
  for (int64_t i = 0; i < n; ++i)  // the last block's lanes past d_out: zero codes (they meet no output)
    for (int64_t o = d_out; o < pad; ++o)
      for (int64_t gi = 0; gi < groups; ++gi)
        std::fill_n(bufs[i] + ((o / crisp_q::kBlock) * groups + gi) * crisp_q::kBlock * crisp_q::kGroup +
                    (o % crisp_q::kBlock) * crisp_q::kGroup, crisp_q::kGroup, int8_t(0));
}

// Boxed, as crisp::fold_: its outputs are the tensors of its list argument.
const auto registered =
    executorch::runtime::register_kernel(executorch::runtime::Kernel("crisp::fold_quant_", fold_quant_));

}  // namespace
