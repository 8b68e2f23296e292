"""Triton path of segment_nll: LM-head matmul, online logsumexp and target capture fused, logits never leave SRAM.

Same contract as kernels/segment_nll_torch.py (the math is written out there). Layout, Liger-style: the two
@triton.jit kernels, then the plain-Python launch plan and launcher `segment_nll_triton`. No atomics, no host sync.

1. `_partials_kernel`, grid = row tiles x vocabulary splits (1-D, grouped order, see below). Program (m, s) computes,
   for its BLOCK_M rows and the vocabulary columns of split s, one [BLOCK_M, BLOCK_N] logits tile at a time (tl.dot
   over H, fp32 accumulator) and folds it into three fp32 partials per row, all in log2 units, stored at [s, row]:
       z2_rj    = log2(e) * z_rj                               (one multiply per logit, see `scale` below)
       mx[s, r] = max_j z2_rj                                  (running max)
       se[s, r] = sum_j 2^(z2_rj - mx[s, r])                   (sum of exp2 relative to that max)
       zt[s, r] = z2_r,target  if the target column lies in split s, else 0
2. `_segment_reduce_kernel`, grid = (segments,). Rows are visited in segment order (stable argsort on the device);
   for each row the splits are merged
       M = max_s mx[s, r],   lse2_r = M + log2(sum_s se[s, r] * 2^(mx[s, r] - M)),   nll_r = ln2 * (lse2_r - sum_s zt)
   and summed per segment in a fixed order (vector accumulator, then one tl.sum): bitwise reproducible.

Why exp2: exp(x) = 2^(x log2 e); folding log2 e into the logit scale lets the epilogue use the native exp2 after a
single multiply per logit.

Scheduling (the launch plan, `plan_launch`):
- Splits: the vocabulary is cut into `num_splits` ranges of whole BLOCK_N blocks so that (a) the CTAs resident at
  once span at most GROUP_M row tiles, whose hidden rows (GROUP_M * BLOCK_M * H * 2 bytes, 16 MiB at H=4096 on
  sm_90) then stay in L2 while every vocabulary block is multiplied against them, and (b) the grid is close to a
  whole number of waves of resident CTAs (SMs x CTAs per SM), the last partial wave being the idle tail.
- Grouped order (the GROUP_M swizzle of Triton's matmul tutorial, with splits in the role of column tiles): program
  ids walk GROUP_M row tiles for split 0, then the same row tiles for split 1, ...; consecutive (= co-resident)
  programs share hidden rows, and the GROUP_M programs of one split read the same weight panels at about the same
  time. Without it (row tile fastest) 128 row tiles at 16k rows read 128 MiB of hidden rows per vocabulary
  block, far more than L2 holds, so every block re-read them from HBM. (The H100 timings with and without this
  order, the 128x256 tiles and TMA loads: bench/results/README.md, from kernel_ab_before_after_h100.csv.)
- Loads: on sm_90+ the scored rows are gathered once and both operands come through TMA tensor descriptors
  (USE_TMA); elsewhere, or for a head TMA cannot tile, plain pointer loads with the row gather in the kernel.
"""

import math
import os

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: pointer loads only
    TensorDescriptor = None

from kernels.common import check_inputs, segment_order

LOG2E = 1.4426950408889634  # log2(e)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2)

# Per-architecture tile configs (major compute capability -> config), bf16/fp16. CTAS_PER_SM is the residency the
# config reaches (registers, shared memory and threads; tests/test_kernel_compile.py checks it on the compiled
# binary); the launch plan counts wave slots with it.
# - sm_90 (the fastest of the configs timed on an H100: bench/results/kernel_tune_h100*.csv, figures in
#   bench/results/README.md): a 128x256 logits tile, K-step 64, 8 warps (two warpgroups, wgmma), 3 stages = 144 KiB
#   of shared memory, one CTA per SM, GROUP_M=16 row tiles (16 MiB of hidden rows at H=4096) sharing L2; faster than
#   the two-CTA 128x128 configs (SM90_TWO_CTA_CONFIGS). FLATTEN: the vocabulary and K loops are software-pipelined as
#   one loop, so the next block's first tiles load during this block's epilogue (faster at every head timed,
#   bench/results/kernel_tune_h100_flatten.csv).
# - sm_80 (not measured; compiled only): mma.sync keeps the accumulator and operand fragments in registers, so a
#   128x128 tile with K-step 32 and 3 stages (48 KiB), one CTA per SM, no spills.
GPU_CONFIGS = {
    9: dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=16, num_warps=8, num_stages=3, FLATTEN=True),
    8: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
}
CTAS_PER_SM = {9: 1, 8: 1}
# Two CTAs per SM on sm_90 (ours, for tuning; `bench/gpu_suite.sh tune` times them against the default): while one
# CTA runs its softmax epilogue the other's wgmma keeps the tensor cores busy. Pass one as `config=`; its CTAS_PER_SM
# sizes the vocabulary split (wave slots = SMs x 2). Residency, spills and tensor cores: tests/test_kernel_compile.py.
# - two_warpgroups_128regs: two warpgroups per CTA capped at 128 registers. Slower than the default on an H100 in the
#   same run (Qwen3-8B head, 16k rows, TMA loads: bench/results/kernel_tune_h100_run3.csv), so not the default.
# - one_warpgroup: one warpgroup per CTA (230 registers x 128 threads), FLATTEN, 96 KiB of shared memory: two CTAs
#   ping-pong on the SM's tensor cores without a register cap. Compiled only; not yet timed on a GPU.
SM90_TWO_CTA_CONFIGS = {
    "two_warpgroups_128regs": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3,
                                   maxnreg=128, CTAS_PER_SM=2),
    "one_warpgroup": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=16, num_warps=4, num_stages=3, FLATTEN=True,
                          CTAS_PER_SM=2),
}
GPU_CONFIG = GPU_CONFIGS[9]  # the default (H100); read by ../shared/tools/triton_aot_check.py (outside the repo)
# In the interpreter the tiles are small so that tiny test shapes span several row tiles, groups, vocabulary blocks
# and K steps; ~4 resident "CTAs" on 2 "SMs" make the split choice non-trivial there too.
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
INTERPRET_SLOTS = 4
MIN_WAVE_EFFICIENCY = 0.9


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) * (1 - e^{-2|x|}) / (1 + e^{-2|x|}); the exponent is <= 0, so nothing overflows.
    t = tl.exp2(-2.8853900817779268 * tl.abs(x))  # -2 * log2(e), literal: see kernel-notes (interpreter constexpr)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _partials_kernel(
    hidden_ptr, weight_ptr, bias_ptr, row_index_ptr, targets_ptr,
    mx_ptr, se_ptr, zt_ptr,
    R, V, H,
    stride_ht, stride_hh, stride_wv, stride_wh,
    num_row_tiles, blocks_per_split,
    scale, softcap2, ignore_index,
    HAS_ROW_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr = 8, EVEN_K: tl.constexpr = False, USE_TMA: tl.constexpr = False,
    FLATTEN: tl.constexpr = False,
):
    # FLATTEN: pipeline the vocabulary loop and the K loop as one (tl.range(flatten=True)): loads for the next
    # vocabulary block are in flight while this block's epilogue runs, instead of the K pipeline draining per block.
    # USE_TMA: hidden_ptr / weight_ptr are TMA tensor descriptors (blocks [BLOCK_M, BLOCK_K] of the gathered,
    # contiguous scored rows and [BLOCK_N, BLOCK_K] of the head): the copy engine fetches whole tiles, zero-filled past
    # R, V and H, and the warps only issue the tensor-core instructions. Otherwise: plain pointers, gathered rows.
    # Grouped program order: pid -> (row tile m, split s), m fastest within a group of GROUP_M row tiles, then s.
    # The last group may hold fewer row tiles (group_rows < GROUP_M); its programs are packed the same way.
    pid = tl.program_id(0)
    num_splits = tl.cdiv(tl.cdiv(V, BLOCK_N), blocks_per_split)
    per_group = GROUP_M * num_splits
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_row_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_s = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    # Rows past R re-read row R - 1 (clamped, no load mask in the K loop); their results are never stored.
    offs_mc = tl.minimum(offs_m, R - 1)
    if HAS_ROW_INDEX:
        rows = tl.load(row_index_ptr + offs_mc).to(tl.int64)
    else:
        rows = offs_mc.to(tl.int64)
    # int32 targets: the per-logit compare below is 32-bit. Rows past R get -1, which matches no column.
    tgt = tl.load(targets_ptr + offs_m, mask=row_ok, other=-1).to(tl.int32)
    live = row_ok & (tgt != ignore_index)

    # A tile whose rows are all ignored (prompt positions scored without a row_index) skips the matmul: the loop
    # bound collapses to an empty range. Its partials stay (-inf, 0, 0) and the finalizer masks those rows anyway.
    n_live = tl.sum(live.to(tl.int32), axis=0)
    v_begin = pid_s * blocks_per_split * BLOCK_N
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_N, V)
    v_end = tl.where(n_live > 0, v_end, v_begin)
    tgt_lo = tl.min(tl.where(live, tgt, V), axis=0)  # live targets lie in [tgt_lo, tgt_hi]
    tgt_hi = tl.max(tl.where(live, tgt, -1), axis=0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of z2
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of 2^(z2 - m_i)
    zt_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # z2 at the target column

    offs_k0 = tl.arange(0, BLOCK_K)
    if not USE_TMA:
        h_rows = hidden_ptr + rows[:, None] * stride_ht
    for v0 in tl.range(v_begin, v_end, BLOCK_N, flatten=FLATTEN):
        offs_n = v0 + tl.arange(0, BLOCK_N)
        if not USE_TMA:
            # Columns past V re-read column V - 1 (clamped: no load mask); they are set to -inf below.
            w_cols = weight_ptr + tl.minimum(offs_n, V - 1).to(tl.int64)[None, :] * stride_wv
        # acc[m, n] = sum_k hidden[row_m, k] * weight[v_n, k]   (weight read as a [BLOCK_K, BLOCK_N] transposed tile)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + offs_k0
            if USE_TMA:
                a = hidden_ptr.load([pid_m * BLOCK_M, k0])
                b = weight_ptr.load([v0, k0]).T
            elif EVEN_K:  # H % BLOCK_K == 0 (every real head): no mask at all
                a = tl.load(h_rows + offs_k[None, :] * stride_hh)
                b = tl.load(w_cols + offs_k[:, None] * stride_wh)
            else:
                k_ok = offs_k < H
                a = tl.load(h_rows + offs_k[None, :] * stride_hh, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_cols + offs_k[:, None] * stride_wh, mask=k_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands; on GPU the operands stay 16-bit
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # z2 = log2(e) * z. Plain head: z2 = acc * scale, scale = logit_scale * log2(e) (one multiply per logit).
        # Softcap: z = softcap * tanh(logit_scale * (acc + bias) / softcap), so scale = logit_scale / softcap and
        # softcap2 = softcap * log2(e).
        if HAS_BIAS:
            acc += tl.load(bias_ptr + tl.minimum(offs_n, V - 1)).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            z2 = softcap2 * _tanh(acc * scale)
        else:
            z2 = acc * scale
        if v0 + BLOCK_N > V:  # only the last block of the vocabulary has columns past V
            z2 = tl.where((offs_n < V)[None, :], z2, float("-inf"))

        # target logit: at most one column of one tile of one split per row; most tiles hold no live target at all
        # (BLOCK_M targets among V / BLOCK_N blocks) and skip the [BLOCK_M, BLOCK_N] compare.
        if (tgt_hi >= v0) & (tgt_lo < v0 + BLOCK_N):
            zt_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], z2, 0.0), axis=1)

        # online logsumexp in log2 units: m' = max(m, max_n z2),  s' = s * 2^(m - m') + sum_n 2^(z2 - m')
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
        # nll = logsumexp(z) - z_target = ln2 * (M + log2 S - zt2)
        # (ignored / masked lanes may have sum_e = 0; feed log2 a 1 there, the lane is zeroed anyway)
        nll = (big_m_safe + tl.log2(tl.where(valid, sum_e, 1.0)) - z_t) * LN2
        nll = tl.where(valid, nll, 0.0)
        tl.store(row_nll_ptr + r, nll, mask=ok)
        acc += nll
        cnt += valid.to(tl.int32)
    tl.store(sum_ptr + seg, tl.sum(acc, axis=0))
    tl.store(count_ptr + seg, tl.sum(cnt, axis=0).to(tl.int64))


# ---- launch plan -----------------------------------------------------------------------------------------------------
def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _needs_upcast(dtype):
    # The interpreter's tl.dot returns garbage for bf16 operands (triton 3.7-3.9); on GPU bf16 goes to tensor cores.
    return _interpreting() and dtype == torch.bfloat16


def _arch(device):
    """Config key of `device`: 9 for sm_90 and newer, 8 below (9 when unknown, e.g. a stand-in properties object)."""
    return 9 if getattr(torch.cuda.get_device_properties(device), "major", 9) >= 9 else 8


def _tma_ok(t):
    """A TMA descriptor needs a 16-byte aligned base, unit stride along the last dim, 16-byte aligned row stride."""
    size = t.element_size()
    return t.stride(1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def _config_for(device):
    if device.type != "cuda":
        return dict(INTERPRET_CONFIG)
    return dict(GPU_CONFIGS[_arch(device)])


def choose_num_splits(num_row_tiles, num_vblocks, slots, group_m):
    """Vocabulary splits for a grid of num_row_tiles x splits programs on `slots` resident CTAs (SMs x CTAs per SM).

    Start from the fewest splits that make the resident programs span at most GROUP_M row tiles (L2 reuse of hidden
    rows, see the module docstring) and fill every slot; then take the first count, up to twice that, whose grid
    fills its last wave to MIN_WAVE_EFFICIENCY, where efficiency = grid / (waves * slots), waves = ceil(grid / slots);
    failing that, the most efficient one. Never more splits than vocabulary blocks.
    """
    tiles_resident = min(group_m, num_row_tiles)
    lo = min(num_vblocks, max(1, math.ceil(slots / tiles_resident)))
    best, best_eff = lo, -1.0
    for s in range(lo, min(num_vblocks, 2 * lo) + 1):
        s_eff = math.ceil(num_vblocks / math.ceil(num_vblocks / s))  # splits that remain non-empty
        grid = num_row_tiles * s_eff
        eff = grid / (math.ceil(grid / slots) * slots)
        if eff >= MIN_WAVE_EFFICIENCY:
            return s
        if eff > best_eff:
            best, best_eff = s, eff
    return best


def _default_num_splits(num_row_tiles, num_vblocks, device, group_m=None, ctas_per_sm=None):
    """Splits for `device` with GROUP_M `group_m` and `ctas_per_sm` resident CTAs (defaults: the device's default
    config; in the interpreter, INTERPRET_SLOTS pretend slots)."""
    if device.type != "cuda":
        return choose_num_splits(num_row_tiles, num_vblocks, INTERPRET_SLOTS, group_m or INTERPRET_CONFIG["GROUP_M"])
    arch = _arch(device)
    slots = torch.cuda.get_device_properties(device).multi_processor_count * (ctas_per_sm or CTAS_PER_SM[arch])
    return choose_num_splits(num_row_tiles, num_vblocks, slots, group_m or GPU_CONFIGS[arch]["GROUP_M"])


def plan_launch(R, V, BLOCK_M, BLOCK_N, num_splits):
    """-> (num_row_tiles, blocks_per_split, num_splits): splits hold whole BLOCK_N blocks and none is empty (an
    empty split would leave max = -inf for live rows)."""
    num_row_tiles = triton.cdiv(R, BLOCK_M)
    num_vblocks = triton.cdiv(V, BLOCK_N)
    num_splits = max(1, min(int(num_splits), num_vblocks))
    blocks_per_split = triton.cdiv(num_vblocks, num_splits)
    return num_row_tiles, blocks_per_split, triton.cdiv(num_vblocks, blocks_per_split)


# ---- launcher --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def segment_nll_triton(hidden, weight, targets, segment_ids, num_segments, *, row_index=None, bias=None,
                       logit_scale=1.0, softcap=None, ignore_index=-100, row_nll_out=None, num_splits=None,
                       config=None):
    """-> (sum_nll fp32 [S], count int64 [S]); same contract as kernels.segment_nll_torch.segment_nll_torch.

    `row_nll_out` (fp32 [R], optional) receives the per-row NLL (0 on ignored rows). `num_splits` and `config`
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, FLATTEN, num_warps, num_stages, maxnreg, USE_TMA, CTAS_PER_SM) override the
    defaults, for tests and tuning. USE_TMA defaults to on for 16-bit inputs on sm_90+ when the head is
    TMA-compatible (row-major).
    """
    R = check_inputs(hidden, weight, targets, segment_ids, num_segments, row_index, bias, row_nll_out)
    device = hidden.device
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError("segment_nll_triton needs CUDA tensors, or TRITON_INTERPRET=1 set before importing triton")
    T, H = hidden.shape
    V = weight.shape[0]
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # tl.dot needs matching operand types (a copy of the head: avoid this case)

    cfg = _config_for(device)
    cfg.update(config or {})
    BLOCK_M, BLOCK_N, BLOCK_K = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    ctas_per_sm = cfg.pop("CTAS_PER_SM", None)  # the config's residency: sizes the split, is not a kernel argument

    sum_nll = torch.zeros(num_segments, dtype=torch.float32, device=device)
    count = torch.zeros(num_segments, dtype=torch.int64, device=device)
    row_nll = row_nll_out if row_nll_out is not None else torch.empty(R, dtype=torch.float32, device=device)
    row_nll.zero_()  # rows outside every segment keep 0
    if R == 0 or (num_segments == 0 and row_nll_out is None):
        return sum_nll, count
    seg_sums, seg_counts = sum_nll, count
    if num_segments == 0:  # nothing to reduce into, but the per-row NLL is wanted: reduce into one scratch segment
        segment_ids, num_segments = torch.zeros_like(segment_ids), 1
        seg_sums = torch.zeros(1, dtype=torch.float32, device=device)
        seg_counts = torch.zeros(1, dtype=torch.int64, device=device)

    targets = targets.to(device=device).contiguous()
    segment_ids = segment_ids.to(device=device).contiguous()
    if row_index is not None:
        row_index = row_index.to(device=device).contiguous()
    if bias is not None:
        bias = bias.to(device=device).contiguous()

    use_tma = cfg.pop("USE_TMA", None)
    if use_tma is None:
        use_tma = device.type == "cuda" and _arch(device) >= 9 and hidden.dtype in (torch.float16, torch.bfloat16)
    use_tma = bool(use_tma) and TensorDescriptor is not None and _tma_ok(weight)
    h_arg, w_arg = hidden, weight
    if use_tma:
        # Gather the scored rows once (an R x H copy, well under 1% of the kernel time at H=4096) so that both
        # operands are row-major matrices TMA can tile; Hopper's TMA has no row gather.
        rows = (hidden if row_index is None else hidden.index_select(0, row_index)).contiguous()
        if _tma_ok(rows):
            h_arg = TensorDescriptor.from_tensor(rows, [BLOCK_M, BLOCK_K])
            w_arg = TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K])
            row_index = None
        else:
            use_tma = False

    if num_splits is None:
        num_splits = _default_num_splits(triton.cdiv(R, BLOCK_M), triton.cdiv(V, BLOCK_N), device, cfg["GROUP_M"],
                                         ctas_per_sm)
    num_row_tiles, blocks_per_split, num_splits = plan_launch(R, V, BLOCK_M, BLOCK_N, num_splits)

    mx = torch.empty((num_splits, R), dtype=torch.float32, device=device)
    se = torch.empty_like(mx)
    zt = torch.empty_like(mx)
    upcast = _needs_upcast(hidden.dtype)
    # fp32 inputs: full-precision dot (TF32 would round the logits to ~1e-3 relative); 16-bit inputs: tensor cores.
    precision = "ieee" if (hidden.dtype == torch.float32 or upcast) else "tf32"
    if softcap is None:
        scale, softcap2 = float(logit_scale) * LOG2E, 1.0
    else:
        scale, softcap2 = float(logit_scale) / float(softcap), float(softcap) * LOG2E
    _partials_kernel[(num_row_tiles * num_splits,)](
        h_arg, w_arg, bias if bias is not None else hidden, row_index if row_index is not None else targets, targets,
        mx, se, zt,
        R, V, H,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        num_row_tiles, blocks_per_split,
        scale, softcap2, ignore_index,
        HAS_ROW_INDEX=row_index is not None, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, EVEN_K=H % BLOCK_K == 0, USE_TMA=use_tma,
        **cfg,  # GROUP_M, num_warps, num_stages and compile options such as maxnreg
    )

    order, bounds = segment_order(segment_ids, num_segments)
    _segment_reduce_kernel[(num_segments,)](
        mx, se, zt, targets, order, bounds,
        row_nll, seg_sums, seg_counts,
        R, num_splits, ignore_index,
        BLOCK_R=128 if not _interpreting() else 32,
    )
    return sum_nll, count
