"""The float64 reference every kernel test compares against (full [R, V] logits, plain torch math, any device),
and a check of the reference itself against torch's own cross-entropy.

Imported by tests/test_kernels.py, tests/test_kernel_schedule.py (through it) and tests/test_kernel_cuda.py; it
imports no kernel code, so it is as independent of the implementations as it can be.
"""

import torch
import torch.nn.functional as F

IGNORE = -100

# Tolerances (relative, absolute) against float64 of the same (already rounded) inputs. Everything after the matmul
# is fp32 in both paths; 16-bit inputs get a looser bound because the product sums of 16-bit operands in the matmul
# are accumulated in a different order than in the float64 reference.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-4, 5e-4), torch.bfloat16: (1e-4, 5e-4)}

def reference(hidden, weight, targets, segment_ids, num_segments, *, row_index=None, bias=None, logit_scale=1.0,
              softcap=None, ignore_index=IGNORE):
    """float64, full [R, V] logits: (sum_nll [S], count [S], row_nll [R])."""
    h = hidden.double() if row_index is None else hidden.double()[row_index.long()]
    z = h @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = logit_scale * z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    z_t = z.gather(1, torch.where(valid, targets, 0).long()[:, None]).squeeze(1)
    row_nll = torch.where(valid, torch.logsumexp(z, dim=1) - z_t, torch.zeros_like(z_t))
    seg = segment_ids.long()
    sum_nll = torch.zeros(num_segments, dtype=torch.float64, device=z.device).index_add_(0, seg, row_nll)
    count = torch.zeros(num_segments, dtype=torch.long, device=z.device).index_add_(0, seg, valid.long())
    return sum_nll, count, row_nll

def test_reference_matches_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (30,), generator=g)
    targets[::4] = IGNORE
    seg = torch.arange(30) % 3
    sum_nll, count, row_nll = reference(hidden, weight, targets, seg, 3)
    ce = F.cross_entropy(hidden.double() @ weight.double().T, targets, ignore_index=IGNORE, reduction="none")
    torch.testing.assert_close(row_nll, ce, rtol=1e-12, atol=1e-12)
    for s in range(3):
        torch.testing.assert_close(sum_nll[s], ce[seg == s].sum(), rtol=1e-12, atol=1e-12)
        assert count[s] == ((targets != IGNORE) & (seg == s)).sum()
