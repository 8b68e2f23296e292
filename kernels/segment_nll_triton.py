"""Triton path of segment_nll: LM-head matmul, online logsumexp and target capture fused, logits never leave SRAM.

Two kernels, no atomics, no host synchronisation:

1. `_partials_kernel`, grid = (row tiles x vocabulary splits). Program (m, s) computes, for its BLOCK_M rows and the
   vocabulary columns of split s, one [BLOCK_M, BLOCK_N] logits tile at a time (tl.dot over H, fp32 accumulator) and
   folds it into three fp32 partials per row, stored at [s, row]:
       mx[s, r]  = max_j z_rj * log2(e)                       (the running max, in log2 units)
       se[s, r]  = sum_j 2^(z_rj * log2(e) - mx[s, r])        (sum of exp, relative to that max)
       zt[s, r]  = z_r,target  if the target column lies in split s, else 0
2. `_segment_reduce_kernel`, grid = (segments,). Rows are visited in segment order (a stable argsort done by torch
   on the device); for each row the splits are merged
       M = max_s mx[s, r],   lse_r = ln2 * (M + log2(sum_s se[s, r] * 2^(mx[s, r] - M))),   nll_r = lse_r - sum_s zt[s, r]
   and summed per segment in a fixed order (vector accumulator, then one tl.sum): the result is bitwise reproducible.

Why exp2: exp(x) = 2^(x * log2 e); pre-scaling by log2 e once per logit lets the epilogue use the native exp2.
Why splits: with few rows (R / BLOCK_M row tiles below the number of SMs) the vocabulary is split so that the grid
still fills the GPU; with many rows there is one split and no merge work beyond a copy.
"""

import math
import os

import torch
import triton
import triton.language as tl

from kernels.segment_nll import _check_inputs  # the argument checks shared with the PyTorch path

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)

# Default tile config (H100, bf16): 128x128 logits tile, K-step 64, 8 warps, 3 pipeline stages. In the interpreter
# the tiles are smaller so that tiny test shapes still span several row tiles, vocabulary blocks and K steps.
GPU_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) * (1 - e^{-2|x|}) / (1 + e^{-2|x|}); the exponent is <= 0, so nothing overflows.
    # (literal log2 e: the interpreter mishandles a global constexpr inside a jit function called from a kernel)
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))  # -2 * log2(e)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, row_index_ptr, targets_ptr,
    mx_ptr, se_ptr, zt_ptr,
    R, V, H,
    stride_ht, stride_hh, stride_wv, stride_wh,
    num_row_tiles, blocks_per_split,
    logit_scale, softcap, ignore_index,
    HAS_ROW_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program order: the row tile varies fastest. Programs resident at the same time therefore work on the same
    # vocabulary split and stream the same weight panels roughly in lockstep, so each panel comes from HBM once per
    # wave and is then served from L2 to the other row tiles.
    pid = tl.program_id(0)
    pid_m = pid % num_row_tiles
    pid_s = pid // num_row_tiles

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    if HAS_ROW_INDEX:
        rows = tl.load(row_index_ptr + offs_m, mask=row_ok, other=0).to(tl.int64)
    else:
        rows = offs_m.to(tl.int64)
    tgt = tl.load(targets_ptr + offs_m, mask=row_ok, other=ignore_index).to(tl.int64)

    # A tile whose rows are all ignored (prompt positions scored without a row_index) skips the matmul: the loop
    # bound collapses to an empty range. Its partials stay (-inf, 0, 0) and the finalizer masks those rows anyway.
    n_active = tl.sum((row_ok & (tgt != ignore_index)).to(tl.int32), axis=0)
    v_begin = pid_s * blocks_per_split * BLOCK_N
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_N, V)
    v_end = tl.where(n_active > 0, v_end, v_begin)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of z * log2 e
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of 2^(z * log2 e - m_i)
    zt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # z at the target column (natural units)

    offs_k0 = tl.arange(0, BLOCK_K)
    h_rows = hidden_ptr + rows[:, None] * stride_ht
    for v0 in range(v_begin, v_end, BLOCK_N):
        offs_n = v0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < v_end
        w_cols = weight_ptr + offs_n.to(tl.int64)[None, :] * stride_wv
        # acc[m, n] = sum_k hidden[row_m, k] * weight[v_n, k]   (weight read as a [BLOCK_K, BLOCK_N] transposed tile)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            k_ok = offs_k < H
            a = tl.load(h_rows + offs_k[None, :] * stride_hh, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + offs_k[:, None] * stride_wh, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands; on GPU the operands stay 16-bit
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # z = logit_scale * (h @ w.T + bias);  z = softcap * tanh(z / softcap)
        z = acc
        if HAS_BIAS:
            z += tl.load(bias_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = z * logit_scale
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)

        # target logit: at most one column of one tile of one split matches
        hit = (offs_n[None, :] == tgt[:, None]) & col_ok[None, :]
        zt_i += tl.sum(tl.where(hit, z, 0.0), axis=1)

        # online logsumexp in log2 units: m' = max(m, max_n z2),  s' = s * 2^(m - m') + sum_n 2^(z2 - m')
        z2 = tl.where(col_ok[None, :], z * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z2, axis=1))
        s_i = s_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z2 - m_new[:, None]), axis=1)
        m_i = m_new

    out = pid_s * R + offs_m
    tl.store(mx_ptr + out, m_i, mask=row_ok)
    tl.store(se_ptr + out, s_i, mask=row_ok)
    tl.store(zt_ptr + out, zt_i, mask=row_ok)


@triton.jit
def _segment_reduce_kernel(
    mx_ptr, se_ptr, zt_ptr, targets_ptr, order_ptr, bounds_ptr,
    row_nll_ptr, sum_ptr, count_ptr,
    R, num_splits, ignore_index,
    BLOCK_R: tl.constexpr,
):
    seg = tl.program_id(0)
    start = tl.load(bounds_ptr + seg)
    end = tl.load(bounds_ptr + seg + 1)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for k0 in range(start, end, BLOCK_R):
        offs = k0 + tl.arange(0, BLOCK_R)
        ok = offs < end
        r = tl.load(order_ptr + offs, mask=ok, other=0)
        valid = ok & (tl.load(targets_ptr + r, mask=ok, other=ignore_index) != ignore_index)
        # merge the vocabulary splits: M = max_s mx_s;  S = sum_s se_s * 2^(mx_s - M);  zt = sum_s zt_s
        big_m = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        for s in range(0, num_splits):
            big_m = tl.maximum(big_m, tl.load(mx_ptr + s * R + r, mask=ok, other=float("-inf")))
        big_m_safe = tl.where(big_m == float("-inf"), 0.0, big_m)  # all-ignored tiles were never computed
        sum_e = tl.zeros((BLOCK_R,), dtype=tl.float32)
        z_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for s in range(0, num_splits):
            m_s = tl.load(mx_ptr + s * R + r, mask=ok, other=float("-inf"))
            sum_e += tl.load(se_ptr + s * R + r, mask=ok, other=0.0) * tl.exp2(m_s - big_m_safe)
            z_t += tl.load(zt_ptr + s * R + r, mask=ok, other=0.0)
        # nll = logsumexp(z) - z_target = ln2 * (M + log2 S) - z_target
        # (ignored / masked lanes may have sum_e = 0; feed log2 a 1 there, the lane is zeroed anyway)
        nll = (big_m_safe + tl.log2(tl.where(valid, sum_e, 1.0))) * LN2 - z_t
        nll = tl.where(valid, nll, 0.0)
        tl.store(row_nll_ptr + r, nll, mask=ok)
        acc += nll
        cnt += valid.to(tl.int32)
    tl.store(sum_ptr + seg, tl.sum(acc, axis=0))
    tl.store(count_ptr + seg, tl.sum(cnt, axis=0).to(tl.int64))


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _needs_upcast(dtype):
    # The interpreter's tl.dot returns garbage for bf16 operands (triton 3.7-3.9); on GPU bf16 goes to tensor cores.
    return _interpreting() and dtype == torch.bfloat16


def _default_num_splits(num_row_tiles, num_vblocks, device):
    """Split the vocabulary only as much as needed to give every SM about two programs."""
    if device.type != "cuda":
        return min(2, num_vblocks)  # interpreter: exercise the split merge without multiplying the (slow) work
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_vblocks, math.ceil(2 * sms / num_row_tiles)))


@torch.no_grad()
def segment_nll_triton(hidden, weight, targets, segment_ids, num_segments, *, row_index=None, bias=None,
                       logit_scale=1.0, softcap=None, ignore_index=-100, return_row_nll=False,
                       num_splits=None, config=None):
    """Triton path; same contract as kernels.segment_nll.segment_nll. `num_splits` and `config` (BLOCK_M, BLOCK_N,
    BLOCK_K, num_warps, num_stages) override the defaults, for tests and tuning."""
    R = _check_inputs(hidden, weight, targets, segment_ids, num_segments, row_index, bias)
    device = hidden.device
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError("segment_nll_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")
    T, H = hidden.shape
    V = weight.shape[0]
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # tl.dot needs matching operand types (a copy of the head: avoid this case)

    cfg = dict(INTERPRET_CONFIG if _interpreting() else GPU_CONFIG)
    cfg.update(config or {})
    BLOCK_M, BLOCK_N, BLOCK_K = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]

    sum_nll = torch.zeros(num_segments, dtype=torch.float32, device=device)
    count = torch.zeros(num_segments, dtype=torch.int64, device=device)
    row_nll = torch.zeros(R, dtype=torch.float32, device=device)
    if R == 0:
        return (sum_nll, count, row_nll) if return_row_nll else (sum_nll, count)
    if num_segments == 0:  # nothing to reduce into; the per-row NLL may still be wanted
        out = segment_nll_triton(hidden, weight, targets, torch.zeros_like(segment_ids), 1, row_index=row_index,
                                 bias=bias, logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index,
                                 return_row_nll=True, num_splits=num_splits, config=config)
        return (sum_nll, count, out[2]) if return_row_nll else (sum_nll, count)

    targets = targets.to(device=device).contiguous()
    segment_ids = segment_ids.to(device=device).contiguous()
    if row_index is not None:
        row_index = row_index.to(device=device).contiguous()
    if bias is not None:
        bias = bias.to(device=device).contiguous()

    num_row_tiles = triton.cdiv(R, BLOCK_M)
    num_vblocks = triton.cdiv(V, BLOCK_N)
    if num_splits is None:
        num_splits = _default_num_splits(num_row_tiles, num_vblocks, device)
    num_splits = max(1, min(int(num_splits), num_vblocks))
    # Recompute the split count so that no split is empty (an empty split would leave max = -inf for live rows).
    blocks_per_split = triton.cdiv(num_vblocks, num_splits)
    num_splits = triton.cdiv(num_vblocks, blocks_per_split)

    mx = torch.empty((num_splits, R), dtype=torch.float32, device=device)
    se = torch.empty_like(mx)
    zt = torch.empty_like(mx)
    upcast = _needs_upcast(hidden.dtype)
    # fp32 inputs: full-precision dot (TF32 would round the logits to ~1e-3 relative); 16-bit inputs: tensor cores.
    precision = "ieee" if (hidden.dtype == torch.float32 or upcast) else "tf32"
    _partials_kernel[(num_row_tiles * num_splits,)](
        hidden, weight, bias if bias is not None else hidden, row_index if row_index is not None else targets, targets,
        mx, se, zt,
        R, V, H,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        num_row_tiles, blocks_per_split,
        float(logit_scale), float(softcap) if softcap is not None else 1.0, ignore_index,
        HAS_ROW_INDEX=row_index is not None, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )

    # Visit rows segment by segment: stable argsort + searchsorted, both asynchronous device ops (no .item()).
    seg64 = segment_ids.long()
    order = torch.argsort(seg64, stable=True)
    bounds = torch.searchsorted(seg64[order], torch.arange(num_segments + 1, device=device, dtype=torch.long))
    _segment_reduce_kernel[(num_segments,)](
        mx, se, zt, targets, order, bounds,
        row_nll, sum_nll, count,
        R, num_splits, ignore_index,
        BLOCK_R=128 if not _interpreting() else 32,
    )
    if return_row_nll:
        return sum_nll, count, row_nll
    return sum_nll, count
