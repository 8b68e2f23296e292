"""Fused scoring kernels. `segment_nll` picks Triton (CUDA) or PyTorch (CPU); both paths are exported for tests."""

from kernels.segment_nll import segment_nll, segment_nll_torch, segment_nll_triton, segment_sum

__all__ = ["segment_nll", "segment_nll_torch", "segment_nll_triton", "segment_sum"]
