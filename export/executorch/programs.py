"""The PyTorch modules an ExecuTorch bundle's program is lowered from: the swappable program
(``forward`` reading dense weight buffers that ``set_task`` rebuilds from the bases and a task's
mixers, with the task guard), its ``set_task`` view, and the attention un-fusing that keeps attention
inside XNNPACK. See ``crisp_edge.export.executorch.export`` for the modes."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from crisp_edge.export.executorch import custom_ops  # noqa: F401 - defines torch.ops.crisp (set_task's fold)
from crisp_edge.errors import ConfigError
from crisp_edge.export.model_io import _Forward
from crisp_edge.export.fold_kernel import channel_major, channel_major_fits
from crisp_edge.export.quantize import basis_codes
from crisp_edge.files.mixers import head_module
from crisp_edge.method.convert import crisp_bases, materialize_
from crisp_edge.method.gates import crisp_weight_matrix, get_gate
from crisp_edge.method.layer import unfold_weight


def _unfuse_attention(model: nn.Module) -> int:
    """Turn timm's fused attention off (its SDPA decomposes into ops XNNPACK does not take)."""
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = False
            n += 1
    return n


class _BufLinear(nn.Module):
    """A linear layer whose weight and bias are buffers (written by ``set_task``, read by ``forward``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bias_buffer: bool = False) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone().contiguous())
        if bias_buffer:
            self.register_buffer("bias", bias.detach().clone().contiguous())
        else:
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class _QBufLinear(nn.Module):
    """An int8 linear whose weight is one int8 buffer in crisp-edge's packed layout (``custom_ops.quantize_weight``:
    codes, per-output-channel scales, column sums), written by ``set_task`` (``crisp::fold_quant_``) and read in
    place by ``crisp::qlinear`` (activations quantized per token at run time). XNNPACK's quantized linear would
    pack a buffer once, at load, and run the load-time task after every switch."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.n, self.k = weight.shape
        self.register_buffer("weight", custom_ops.quantize_weight(weight))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.crisp.qlinear(x, self.weight, self.bias, self.n)


class _RowMajorBufLinear(_BufLinear):
    """A ``_BufLinear`` whose product is ``crisp::rowmajor_linear``: the weight buffer read in place, where
    XNNPACK would pack it again at every call (it is not a constant). For few rows: a decode step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.crisp.rowmajor_linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class _RowMajorLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose product is ``crisp::rowmajor_linear``: a language model's vocabulary
    projection, one position per call, reading its weight in place (a tied head: the embedding itself)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.crisp.rowmajor_linear(x, self.weight)


def rowmajor_head(model: nn.Module) -> None:
    """Make ``model``'s (bias-free) vocabulary projection a ``_RowMajorLinear``, in place."""

    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.bias is None:
        head.__class__ = _RowMajorLinear


class _FlippedBufLinear(_BufLinear):
    """A ``_BufLinear`` computed flipped, ``(W @ x^T)^T``, for many rows: a language model's prefill.

    XNNPACK packs the weight operand of a product at every call when it is not a constant (a task weight
    buffer); packing every weight of a prompt's layers held a SmolLM2 prefill at 0.93x of the dense program's
    (its weights packed once, at load). Flipped, the weight buffer is the product's *input*, read in place,
    and the operand XNNPACK packs per call is the activation (T x d_in: a 64-token prompt's is 1/9 to 1/24 of a
    SmolLM2 weight); the transpose back is one of the small (T x d_out) result. (ONNX Runtime's swappable
    prefill flips its products for the same reason: ``export/onnx/lm_paths.py``.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a matmul, not F.linear(W, x): that one decomposes into a product XNNPACK's partitioner leaves out
        y = torch.matmul(self.weight, x.reshape(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def task_linear_view(prog: nn.Module, linear: type[_BufLinear]) -> nn.Module:
    """A copy of ``prog`` sharing every parameter and buffer (same tensors, same names: a method lowered from
    it shares the program's mutable buffers) whose task weights (``_BufLinear``) compute with ``linear``
    (``_RowMajorBufLinear``: ``crisp::rowmajor_linear``, which needs crisp-edge's kernels at run time
    (``custom_ops.load_kernels``); ``_FlippedBufLinear``: XNNPACK's product, flipped)."""

    tensors = [*prog.parameters(), *prog.buffers()]
    view = copy.deepcopy(prog, {id(t): t for t in tensors})
    for m in view.modules():
        if type(m) is _BufLinear:
            m.__class__ = linear
    return view


class _SwapProgram(nn.Module):
    """The dense architecture with CRISP weights (and the head) as buffers, the bases as constants, and
    ``set_task`` rebuilding the buffers from task inputs. ``forward`` runs the model.

    ``quantize="int8"``: the CRISP linears are ``_QBufLinear`` (int8 packed buffers) and each basis is stored as
    int8 codes, transposed (r, u) and channel-major where the group's shapes allow (``fold_kernel.channel_major``),
    with one float32 scale per term (``basis_scales``), as ONNX Runtime's swappable int8 bundle stores them
    (``export/quantize.py`` ``basis_codes``): a quarter of the float32 bytes to store and to read at each switch. ``set_task`` multiplies each term's scale into the gated mixers and ``crisp::fold_quant_``
    folds the codes as they are, quantizing each layer's weight into its buffer.

    The task guard: ``set_task`` writes the bundle's tag into the buffer ``task_tag`` (zero in the
    program's initial state); ``forward`` multiplies its output by ``index_select(ones(1), 0,
    task_tag != tag)``, i.e. by 1 once a task is set. Before any ``set_task`` the index is 1, out of
    range, and ExecuTorch's bounds-checked portable kernel fails the whole ``forward`` (error 0x12,
    InvalidArgument, logged as "index[0] = 1 is out of range") instead of returning all-zero logits:
    the plain ``Runtime.load_program(pte, data_path=ptd)`` / C++ ``Module(pte, ptd)`` path, which never
    calls ``set_task``, fails loudly. (ExecuTorch 1.5.1 removes ``torch._assert_async`` and
    ``aten._assert_scalar`` from programs in ``RemoveGraphAssertsPass``, so an assert op cannot do it.)
    """

    #: Fold with ``crisp::fold_`` where the layout allows (False: stock operators only, for comparisons).
    fused_fold = True

    def __init__(self, model: nn.Module, names: list[str], max_classes: int | None, tag: int = 0,
                 quantize: str | None = None) -> None:
        super().__init__()
        self.tag = int(tag)
        self.quantize = quantize  # "int8": the CRISP linears are _QBufLinear, set_task crisp::fold_quant_
        self.register_buffer("task_tag", torch.zeros(1, dtype=torch.int64))
        self.register_buffer("task_guard", torch.ones(1))
        dense = materialize_(copy.deepcopy(model))
        _unfuse_attention(dense)
        self.bases = nn.ParameterDict()
        self.basis_scales = nn.ParameterDict()  # int8: each basis term's scale (r,), multiplied into the mixers
        self.groups: list[tuple] = []
        for key, b in crisp_bases(model).items():
            bkey = key.replace(".", "_")
            self.groups.append((key, bkey, list(b.layer_names), b.gate_name, b.placement, b.d_out, b.d_in, b.transpose,
                                quantize is not None and channel_major_fits(b.d_out, b.d_in, b.s)))
            if quantize is not None and (b.placement != "pre" or b.transpose):
                raise ConfigError(f"quantize={quantize!r} swappable: group {key!r} is folded as placement "
                                  f"{b.placement!r}{', transposed' if b.transpose else ''}; crisp::fold_quant_ takes "
                                  "placement 'pre', not transposed (every crisp-edge ViT recipe). Export it as float32 "
                                  "swappable or int8 dense.")
            if quantize is None:
                self.bases[bkey] = nn.Parameter(b.weight.detach().clone(), requires_grad=False)
            else:
                # int8 codes stored transposed, (r, u): the layout fold_core.h's int8 fold reads fastest (each
                # term's codes contiguous); ONNX Runtime's swappable int8 bundle stores the same codes and scales
                codes, scales = basis_codes(b.weight.detach().float().T.contiguous().numpy())
                if channel_major_fits(b.d_out, b.d_in, b.s):  # fold_kernel.channel_major: 16 channels a pass
                    codes = channel_major(codes, b.d_out, b.d_in, b.s)
                self.bases[bkey] = nn.Parameter(torch.from_numpy(codes), requires_grad=False)
                self.basis_scales[bkey] = nn.Parameter(torch.from_numpy(scales), requires_grad=False)
            for n in b.layer_names:
                lin = dense.get_submodule(n)
                _replace(dense, n, (_QBufLinear if quantize else _BufLinear)(lin.weight, lin.bias))
        self.head_path = None
        found = head_module(model)
        if found is not None and max_classes is not None:
            self.head_path, head = found
            w = torch.zeros(max_classes, head.in_features)
            b = torch.zeros(max_classes)
            w[:head.out_features] = head.weight.detach()
            if head.bias is not None:
                b[:head.out_features] = head.bias.detach()
            _replace(dense, self.head_path, _BufLinear(w, b, bias_buffer=True))
        for p in dense.parameters():
            p.requires_grad_(False)
        self.fwd = _Forward(dense, names)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        unset = (self.task_tag != self.tag).long()  # 0 once set_task ran: the index is in range
        return self.fwd(*xs) * torch.index_select(self.task_guard, 0, unset)

    def set_task(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Every CRISP layer's buffer rebuilt from the task's mixers. A group whose weight is ``B @ G(A)``
        reshaped (placement "pre", not transposed: every group crisp-edge's ViT recipes make) is folded by one
        ``crisp::fold_`` call (``custom_ops``), which reads the basis once for all the group's layers and writes
        their buffers in place: no write-back copy. Other groups run one product a layer (XNNPACK, s output
        columns) and a copy into the buffer; with stock operators that was the fastest layout measured (one
        product a group then split on its columns 1.32x as long, the transposed product then transposed by
        XNNPACK 1.92x; ``bench/bench_fold_layouts.py --executorch``, ``bench/results/fold_layouts.json``).
        int8: every group is one ``crisp::fold_quant_`` call over its int8 codes, the mixers scaled per term."""
        for (key, bkey, layers, gate, placement, d_out, d_in, transpose, cm), mixers in zip(self.groups, inputs):
            g = get_gate(gate)
            if self.quantize:  # the int8 codes summed as they are, each term's scale in the mixers
                torch.ops.crisp.fold_quant_([self.fwd.model.get_submodule(n).weight for n in layers],
                                            self.bases[bkey], g.fn(mixers) * self.basis_scales[bkey][:, None], d_in, cm)
                continue
            if self.fused_fold and placement == "pre" and not transpose:
                torch.ops.crisp.fold_([self.fwd.model.get_submodule(n).weight for n in layers], self.bases[bkey],
                                      g.fn(mixers))
                continue
            for j, n in enumerate(layers):
                w = unfold_weight(crisp_weight_matrix(self.bases[bkey], mixers[j], g, placement), d_out, d_in, transpose)
                self.fwd.model.get_submodule(n).weight.copy_(w)
        if self.head_path is not None:
            head = self.fwd.model.get_submodule(self.head_path)
            head.weight.copy_(inputs[len(self.groups)])
            head.bias.copy_(inputs[len(self.groups) + 1])
        self.task_tag.fill_(self.tag)
        return torch.zeros(1)


class _SetTaskView(_SwapProgram):
    """The same module (same buffers, same names) with ``set_task`` as its ``forward``, for export."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.set_task(*inputs)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
