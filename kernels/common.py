"""What both paths of segment_nll share: the argument checks and the deterministic per-segment sum.

Imported by kernels/segment_nll_torch.py and kernels/segment_nll_triton.py; imports neither (no cycle).
"""

import torch


def check_inputs(hidden, weight, targets, segment_ids, num_segments, row_index, bias, row_nll_out=None):
    """Raise ValueError on inconsistent shapes; return R, the number of scored rows."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    n_rows = hidden.shape[0] if row_index is None else row_index.shape[0]
    if row_index is not None and row_index.dim() != 1:
        raise ValueError("row_index must be 1-D")
    if targets.shape != (n_rows,) or segment_ids.shape != (n_rows,):
        raise ValueError(f"targets and segment_ids must be [{n_rows}] (one per scored row), "
                         f"got {tuple(targets.shape)} and {tuple(segment_ids.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if num_segments < 0:
        raise ValueError("num_segments must be >= 0")
    if row_nll_out is not None and (row_nll_out.shape != (n_rows,) or row_nll_out.dtype != torch.float32
                                    or row_nll_out.device != hidden.device):
        raise ValueError(f"row_nll_out must be an fp32 [{n_rows}] tensor on {hidden.device}")
    return n_rows


def segment_sum(values, segment_ids, num_segments):
    """Deterministic per-segment sum of fp32 `values` [R] (no atomics, no host sync).

    index_add_ on CUDA adds floats with atomics, so the order (and the last bits) would change from run to run and
    could flip the ranking of near-tied candidates. Instead: stable sort by segment, prefix sums in float64, and
    sum[s] = csum[end_s] - csum[start_s] with start/end found by searchsorted. The float64 prefix keeps the difference
    exact to ~1e-16 relative to the running total, far below fp32 resolution of any segment sum.
    """
    order, bounds = segment_order(segment_ids, num_segments)
    csum = torch.zeros(values.shape[0] + 1, dtype=torch.float64, device=values.device)
    csum[1:] = torch.cumsum(values[order].double(), 0)
    return (csum[bounds[1:]] - csum[bounds[:-1]]).float()


def segment_order(segment_ids, num_segments):
    """-> (order [R], bounds [num_segments + 1]): rows of segment s are order[bounds[s]:bounds[s + 1]], in row order.

    A stable argsort and a searchsorted, both asynchronous on the device (no .item(), no nonzero()). Ids outside
    [0, num_segments) sort before or after every segment and fall in no [bounds[s], bounds[s + 1]) range.
    """
    seg64 = segment_ids.long()
    order = torch.argsort(seg64, stable=True)
    bounds = torch.searchsorted(seg64[order], torch.arange(num_segments + 1, device=seg64.device, dtype=torch.long))
    return order, bounds
