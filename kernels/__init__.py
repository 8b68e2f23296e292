"""Fused LM head + per-segment cross-entropy for scoring: `segment_nll`, the one entry point.

    from kernels import segment_nll
    sum_nll, count = segment_nll(hidden, weight, targets, segment_ids, num_segments, row_index=rows)

Two implementations of the same contract (see kernels/segment_nll_torch.py for the math):
- kernels/segment_nll_triton.py: `segment_nll_triton`, fused Triton kernels (CUDA, or the interpreter in tests);
- kernels/segment_nll_torch.py: `segment_nll_torch`, chunked PyTorch (CPU, and the oracle for the kernel);
both built on kernels/common.py (argument checks, deterministic per-segment sum). `segment_nll` picks Triton for
CUDA tensors and PyTorch otherwise; `SAPO_KERNEL=torch|triton|auto` overrides the choice.
"""

import os

# the modules, not their functions: a package attribute named like a submodule would be overwritten by that
# submodule on its first import (kernels.segment_nll_torch is the module, kernels.segment_nll_torch.segment_nll_torch
# the function)
from kernels import segment_nll_torch as torch_path

__all__ = ["segment_nll"]


def _use_triton(hidden):
    mode = os.environ.get("SAPO_KERNEL", "").strip().lower()
    if mode == "torch":
        return False
    if mode == "triton":
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("SAPO_KERNEL=triton on CPU tensors needs TRITON_INTERPRET=1 "
                               "(set before importing triton)")
        return True
    if mode not in ("", "auto"):
        raise ValueError(f"SAPO_KERNEL must be torch, triton or auto, got {mode!r}")
    return hidden.is_cuda


def segment_nll(hidden, weight, targets, segment_ids, num_segments, *, row_index=None, bias=None,
                logit_scale=1.0, softcap=None, ignore_index=-100):
    """-> (sum_nll: fp32 [num_segments], count: int64 [num_segments])

    hidden [T, H] (fp32/fp16/bf16, final normed hidden states), weight [V, H] (LM head, possibly the tied embedding),
    bias optional [V]. row_index optional int [R]: rows of hidden to score; targets/segment_ids [R] are aligned with
    it (entry k describes row row_index[k]); without it R = T. Forward only, no autograd.
    """
    if _use_triton(hidden):
        # Imported here, not at the top: with TRITON_INTERPRET=1 the interpreter is chosen when the @triton.jit
        # functions are defined, so that module must be imported after the env var is set (conftest does it first).
        from kernels import segment_nll_triton as triton_path
        impl = triton_path.segment_nll_triton
    else:
        impl = torch_path.segment_nll_torch
    return impl(hidden, weight, targets, segment_ids, num_segments, row_index=row_index, bias=bias,
                logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index)
