"""PyTorch path of segment_nll: LM head + per-segment cross-entropy, chunked over rows and vocabulary.

For every scored row r (a response position, already shifted so that `targets[k]` is the token that follows
`hidden[row_index[k]]`):

    z      = logit_scale * (hidden[r] @ weight.T + bias)          # [V], fp32 after the matmul
    z      = softcap * tanh(z / softcap)                          # only when softcap is given
    nll_r  = logsumexp(z) - z[target_r]                           # 0 where target_r == ignore_index

and per segment s (one candidate x instance sequence in a packed scoring batch):

    sum_nll[s] = sum of nll_r over rows with segment_ids == s
    count[s]   = number of those rows whose target is not ignore_index

This is the CPU path, and the oracle the Triton kernel is checked against (besides the float64 reference in
tests/test_kernel_reference.py). Segment ids must lie in [0, num_segments): a row outside that range is left out of
every sum and count.
"""

import torch

from kernels.common import check_inputs, segment_sum

# Row x vocabulary chunk: at most ROWS * VOCAB fp32 logits live at once (32 MiB here), whatever V is (151936 for
# Qwen3), so scoring 64k rows never allocates a [R, V] tensor.
TORCH_CHUNK_ROWS = 1024
TORCH_CHUNK_VOCAB = 8192


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
                      logit_scale=1.0, softcap=None, ignore_index=-100, row_nll_out=None,
                      chunk_rows=TORCH_CHUNK_ROWS, chunk_vocab=TORCH_CHUNK_VOCAB):
    """-> (sum_nll fp32 [S], count int64 [S]); see the module docstring. `row_nll_out` (fp32 [R], optional) receives
    the per-row NLL (0 on ignored rows); `chunk_rows` / `chunk_vocab` bound the logits block."""
    n_rows = check_inputs(hidden, weight, targets, segment_ids, num_segments, row_index, bias, row_nll_out)
    device = hidden.device
    V = weight.shape[0]
    targets = targets.to(device=device, dtype=torch.long)
    segment_ids = segment_ids.to(device=device, dtype=torch.long)
    row_nll = row_nll_out if row_nll_out is not None else torch.empty(n_rows, dtype=torch.float32, device=device)
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
    return segment_sum(row_nll, segment_ids, num_segments), count
