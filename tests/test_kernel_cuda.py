"""The compiled Triton kernels on a real GPU against float64 (skipped without CUDA; the rest of the suite covers the
same code through the interpreter). Run on a CUDA machine with the interpreter off:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_kernel_cuda.py

Ragged shapes, every dtype, both load paths (TMA descriptors on sm_90+, pointers otherwise or when the head's layout
rules TMA out), softcap / scale / bias, row_index, a fixed split count and the launch plan's own, and the sm_90
two-CTA tuning candidates (SM90_TWO_CTA_CONFIGS).
"""

import os

import pytest
import torch

from test_kernel_reference import TOL, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs CUDA and TRITON_INTERPRET unset or 0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["plain", "row_index", "softcap_bias", "head_transposed", "h_unaligned", "no_tma",
                                  "splits_7", "two_warpgroups_128regs", "one_warpgroup"])
def test_cuda_kernel_against_float64(dtype, case):
    from kernels import segment_nll_triton as snt

    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, V, S = 300, (100 if case == "h_unaligned" else 200), 5003, 7  # H=100: rows of 200 bytes, no TMA
    hidden = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(V, H, device="cuda", generator=g) / H ** 0.5 * 3).to(dtype)
    if case == "head_transposed":
        weight = weight.T.contiguous().T
    row_index = torch.randperm(T, device="cuda", generator=g)[:211] if case == "row_index" else None
    R = T if row_index is None else row_index.numel()
    targets = torch.randint(0, V, (R,), device="cuda", generator=g)
    targets[torch.rand(R, device="cuda", generator=g) < 0.2] = -100
    seg = torch.randint(0, S, (R,), device="cuda", generator=g)
    bias = torch.randn(V, device="cuda", generator=g).to(dtype) if case == "softcap_bias" else None
    kw = dict(logit_scale=0.8, softcap=15.0) if case == "softcap_bias" else {}
    config = dict(USE_TMA=False) if case == "no_tma" else snt.SM90_TWO_CTA_CONFIGS.get(case)
    row_nll = torch.full((R,), float("nan"), device="cuda")
    sum_nll, count = snt.segment_nll_triton(hidden, weight, targets, seg, S, row_index=row_index, bias=bias,
                                            row_nll_out=row_nll, config=config,
                                            num_splits=7 if case == "splits_7" else None, **kw)
    ref_sum, ref_count, ref = reference(hidden, weight, targets, seg, S, row_index=row_index, bias=bias, **kw)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(row_nll.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(sum_nll.double(), ref_sum, rtol=rtol, atol=atol * 10)
    assert torch.equal(count, ref_count)
    again = snt.segment_nll_triton(hidden, weight, targets, seg, S, row_index=row_index, bias=bias, config=config,
                                   num_splits=7 if case == "splits_7" else None, **kw)
    assert torch.equal(again[0], sum_nll)  # bitwise repeatable (no atomics)
