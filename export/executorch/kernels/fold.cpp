// crisp::fold_(Tensor(a!)[] self, Tensor basis, Tensor mixers) -> (): a swappable bundle's set_task for one
// CRISP group in one call. self holds the group's n layers' dense weights (each u * s floats: the row-major
// (d_out, d_in) reshape of the layer's (u, s) product); basis is the group's B (u, r); mixers the gated
// mixers G(A_i) stacked (n, r, s). It writes W_i = reshape(B @ G(A_i)) straight into self[i] (the program's
// mutable buffers): the basis is read once for all the group's layers, and nothing is copied afterwards.
//
// The arithmetic is export/kernels/fold_core.h's (shared with the plain C entry point ONNX Runtime's Python
// session calls). Each output is the same sum as torch's B @ G(A_i) (float32, terms in order t = 0..r-1), so
// the weights agree with the PyTorch fold to rounding.
#include <vector>

#include "../../kernels/fold_core.h"
#include "crisp_kernels.h"

using executorch::aten::ArrayRef;
using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::EValue;
using executorch::runtime::KernelRuntimeContext;
using executorch::runtime::Span;

namespace {

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
  std::vector<float*> outs(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    ET_KERNEL_CHECK_MSG(ctx, ws[i].scalar_type() == ScalarType::Float && ws[i].numel() == u * s, InvalidArgument, ,
                        "crisp::fold_: a weight is not float32 with u * s elements");
    outs[i] = ws[i].mutable_data_ptr<float>();
  }
  crisp_fold::fold_group(basis.const_data_ptr<float>(), r, 1, u, r, mixers.const_data_ptr<float>(), n, s, outs.data());
}

// A boxed kernel: the unboxing helper (EXECUTORCH_LIBRARY) wants exactly one output tensor, and this op's
// outputs are the tensors of its list argument.
const auto registered = executorch::runtime::register_kernel(executorch::runtime::Kernel("crisp::fold_", fold_));

}  // namespace
