"""Fused LM head + per-segment cross-entropy: the public entry point and the PyTorch path.

For every scored row r (a response position, already shifted so that `targets[k]` is the token that follows
`hidden[row_index[k]]`):

    z      = logit_scale * (hidden[r] @ weight.T + bias)          # [V], fp32 after the matmul
    z      = softcap * tanh(z / softcap)                          # only when softcap is given
    nll_r  = logsumexp(z) - z[target_r]                           # 0 where target_r == ignore_index

and per segment s (one candidate x instance sequence in a packed scoring batch):

    sum_nll[s] = sum of nll_r over rows with segment_ids == s
    count[s]   = number of those rows whose target is not ignore_index

`segment_nll` dispatches to the Triton kernel (kernels/segment_nll_triton.py) for CUDA tensors and to the chunked
PyTorch implementation below otherwise; `SAPO_KERNEL=torch|triton` forces either. The PyTorch path is also the
oracle the Triton kernel is checked against (besides the float64 reference in tests/test_kernels.py).

Segment ids must lie in [0, num_segments): a row outside that range is left out of every sum and count, and its
row_nll is unspecified (the PyTorch path fills it in, the Triton path leaves 0).
"""

import os

import torch

# Row x vocabulary chunk of the PyTorch path: at most ROWS * VOCAB fp32 logits live at once (32 MiB here), whatever
# V is (151936 for Qwen3), so scoring 64k rows never allocates a [R, V] tensor.
TORCH_CHUNK_ROWS = 1024
TORCH_CHUNK_VOCAB = 8192


def _check_inputs(hidden, weight, targets, segment_ids, num_segments, row_index, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
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
    return n_rows


def segment_sum(values, segment_ids, num_segments):
    """Deterministic per-segment sum of fp32 `values` [R] (no atomics, no host sync).

    index_add_ on CUDA adds floats with atomics, so the order (and the last bits) would change from run to run and
    could flip the ranking of near-tied candidates. Instead: stable sort by segment, prefix sums in float64, and
    sum[s] = csum[end_s] - csum[start_s] with start/end found by searchsorted. The float64 prefix keeps the difference
    exact to ~1e-16 relative to the running total, far below fp32 resolution of any segment sum.
    """
    order = torch.argsort(segment_ids, stable=True)
    sorted_ids = segment_ids[order]
    csum = torch.zeros(values.shape[0] + 1, dtype=torch.float64, device=values.device)
    csum[1:] = torch.cumsum(values[order].double(), 0)
    bounds = torch.searchsorted(sorted_ids, torch.arange(num_segments + 1, device=values.device,
                                                         dtype=sorted_ids.dtype))
    return (csum[bounds[1:]] - csum[bounds[:-1]]).float()


def _logits_fp32(h, w):
    """h [r, H] @ w[v, H].T with fp32 output. On CUDA keep half/bf16 operands (fp32 accumulate, fp32 out, no bf16
    rounding of the logits); on CPU upcast the chunk, which is both exact-er and faster there."""
    if h.is_cuda and h.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(h, w.T, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch without mm(out_dtype=)
            return torch.mm(h, w.T).float()
    return torch.mm(h.float(), w.float().T)


@torch.no_grad()
def segment_nll_torch(hidden, weight, targets, segment_ids, num_segments, *, row_index=None, bias=None,
                      logit_scale=1.0, softcap=None, ignore_index=-100, return_row_nll=False,
                      chunk_rows=TORCH_CHUNK_ROWS, chunk_vocab=TORCH_CHUNK_VOCAB):
    """PyTorch path: chunked over rows and vocabulary with an online logsumexp in fp32 (see module docstring)."""
    n_rows = _check_inputs(hidden, weight, targets, segment_ids, num_segments, row_index, bias)
    device = hidden.device
    V = weight.shape[0]
    targets = targets.to(device=device, dtype=torch.long)
    segment_ids = segment_ids.to(device=device, dtype=torch.long)
    row_nll = torch.zeros(n_rows, dtype=torch.float32, device=device)
    bias32 = None if bias is None else bias.float()

    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        h = hidden[r0:r1] if row_index is None else hidden[row_index[r0:r1].long()]
        tgt = targets[r0:r1]
        # Online logsumexp over vocabulary chunks: lse <- log(e^lse + e^lse_chunk), lse_chunk = logsumexp_j z_j.
        # (torch.logsumexp subtracts the chunk max internally; logaddexp merges two maxima the same way.)
        lse = torch.full((r1 - r0,), float("-inf"), dtype=torch.float32, device=device)
        z_tgt = torch.zeros(r1 - r0, dtype=torch.float32, device=device)
        for v0 in range(0, V, chunk_vocab):
            v1 = min(v0 + chunk_vocab, V)
            z = _logits_fp32(h, weight[v0:v1])
            if bias32 is not None:
                z += bias32[v0:v1]
            if logit_scale != 1.0:
                z *= logit_scale
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=1))
            # Capture z[target] from the same logits the logsumexp saw (so nll >= 0 up to rounding); the gather
            # index is clamped and the result masked, which avoids a data-dependent (syncing) selection.
            in_chunk = (tgt >= v0) & (tgt < v1)
            picked = z.gather(1, (tgt - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            z_tgt = torch.where(in_chunk, picked, z_tgt)
        nll = lse - z_tgt
        row_nll[r0:r1] = torch.where(tgt != ignore_index, nll, torch.zeros_like(nll))

    valid = (targets != ignore_index).long()
    in_range = (segment_ids >= 0) & (segment_ids < num_segments)
    count = torch.zeros(num_segments, dtype=torch.long, device=device)
    if num_segments > 0:  # integer adds: exact in any order
        count.index_add_(0, segment_ids.clamp(0, num_segments - 1), valid * in_range)
    sum_nll = segment_sum(row_nll, segment_ids, num_segments)
    if return_row_nll:
        return sum_nll, count, row_nll
    return sum_nll, count


def segment_nll_triton(hidden, weight, targets, segment_ids, num_segments, **kwargs):
    """Triton path (kernels/segment_nll_triton.py). Imported lazily: with TRITON_INTERPRET=1 the interpreter is chosen
    when the @triton.jit functions are defined, so the env var must be set before that module is first imported."""
    from kernels.segment_nll_triton import segment_nll_triton as _impl
    return _impl(hidden, weight, targets, segment_ids, num_segments, **kwargs)


def _use_triton(hidden):
    mode = os.environ.get("SAPO_KERNEL", "").strip().lower()
    if mode == "torch":
        return False
    if mode == "triton":
        if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("SAPO_KERNEL=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        return True
    if mode not in ("", "auto"):
        raise ValueError(f"SAPO_KERNEL must be torch, triton or auto, got {mode!r}")
    return hidden.is_cuda


def segment_nll(hidden, weight, targets, segment_ids, num_segments, *, row_index=None, bias=None,
                logit_scale=1.0, softcap=None, ignore_index=-100, return_row_nll=False):
    """-> (sum_nll: fp32 [num_segments], count: int64 [num_segments]) or, with return_row_nll=True,
          (sum_nll, count, row_nll: fp32 [R])

    hidden [T, H] (fp32/fp16/bf16, final normed hidden states), weight [V, H] (LM head, possibly the tied embedding),
    bias optional [V]. row_index optional int [R]: rows of hidden to score; targets/segment_ids [R] are aligned with
    it (entry k describes row row_index[k]); without it R = T. Forward only, no autograd.
    """
    impl = segment_nll_triton if _use_triton(hidden) else segment_nll_torch
    return impl(hidden, weight, targets, segment_ids, num_segments, row_index=row_index, bias=bias,
                logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index, return_row_nll=return_row_nll)
