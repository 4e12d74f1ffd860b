// Shared by crisp-edge's ExecuTorch kernels (export/executorch/kernels/*.cpp): the ExecuTorch headers the
// wheel ships, and CRISP_MULTIVERSION, which builds a hot loop once per x86-64 vector width (picked at
// load by the CPU's features) so one library runs fast on any x86-64; other targets (aarch64: NEON)
// get the compiler's own vectorisation at -O3.
#pragma once
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CRISP_MULTIVERSION __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define CRISP_MULTIVERSION
#endif
