"""kernels.segment_nll against a float64 reference (full logits, plain torch math).

Both paths are exercised on CPU: the PyTorch path directly, the Triton kernels through the interpreter
(TRITON_INTERPRET=1 is set in conftest.py before anything imports triton). Shapes are tiny and deliberately ragged
(T, H, V not multiples of the tiles) because the interpreter is slow and does not raise on out-of-bounds loads.
"""

import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels
from kernels import segment_nll
from kernels import segment_nll_torch as snt_torch
from kernels import segment_nll_triton as snt
from kernels.common import segment_sum
from test_kernel_reference import IGNORE, TOL, reference

sn = kernels  # the dispatcher lives in the package itself


def _with_row_nll(fn):
    """The launchers write per-row NLLs into `row_nll_out`; the tests ask for them with return_row_nll=True and get
    (sum_nll, count, row_nll) back."""
    @functools.wraps(fn)
    def call(hidden, weight, targets, segment_ids, num_segments, *, return_row_nll=False, **kw):
        if not return_row_nll:
            return fn(hidden, weight, targets, segment_ids, num_segments, **kw)
        n_rows = hidden.shape[0] if kw.get("row_index") is None else kw["row_index"].shape[0]
        row_nll = torch.full((n_rows,), float("nan"), dtype=torch.float32)  # NaN: an unwritten row shows
        return fn(hidden, weight, targets, segment_ids, num_segments, row_nll_out=row_nll, **kw) + (row_nll,)
    return call


segment_nll_torch = _with_row_nll(snt_torch.segment_nll_torch)
segment_nll_triton = _with_row_nll(snt.segment_nll_triton)

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set TRITON_INTERPRET=1 before triton is imported"


# Paths under test. Small chunks / several vocabulary splits make tiny shapes cross every chunk and split boundary.
PATHS = {
    "torch": segment_nll_torch,
    "torch_chunked": functools.partial(segment_nll_torch, chunk_rows=7, chunk_vocab=129),
    "triton": segment_nll_triton,
    "triton_1split": functools.partial(segment_nll_triton, num_splits=1),
    "triton_3split": functools.partial(segment_nll_triton, num_splits=3),
}
FAST_PATHS = ["torch_chunked", "triton"]

def make_batch(T, H, V, S, dtype=torch.float32, seed=0, scale=1.0):
    """Random batch with the awkward cases built in: ignored first and last rows and, when S >= 4, segment 1 empty and
    segment 2 a single scored token."""
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(T, H, generator=g)).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[0] = IGNORE
    targets[-1] = IGNORE
    targets[torch.rand(T, generator=g) < 0.15] = IGNORE
    seg = torch.randint(0, S, (T,), generator=g)
    if S >= 4:
        seg[(seg == 1) | (seg == 2)] = 0
        seg[1] = 2  # one-token segment, and its row is scored
        targets[1] = 5
    return hidden, weight, targets, seg


def assert_close_to_reference(out, ref, dtype):
    rtol, atol = TOL[dtype]
    sum_nll, count, row_nll = out
    ref_sum, ref_count, ref_row = ref
    assert sum_nll.dtype == torch.float32 and row_nll.dtype == torch.float32 and count.dtype == torch.int64
    torch.testing.assert_close(count, ref_count, rtol=0, atol=0)
    torch.testing.assert_close(row_nll.double(), ref_row, rtol=rtol, atol=atol)
    torch.testing.assert_close(sum_nll.double(), ref_sum, rtol=rtol, atol=atol * 10)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_ragged_shapes_all_dtypes(path, dtype):
    T, H, V, S = 45, 72, 1111, 6  # none a multiple of any tile
    hidden, weight, targets, seg = make_batch(T, H, V, S, dtype)
    out = PATHS[path](hidden, weight, targets, seg, S, return_row_nll=True)
    ref = reference(hidden, weight, targets, seg, S)
    assert_close_to_reference(out, ref, dtype)
    # the built-in edge cases really are there and come out right
    assert out[1][1] == 0 and out[0][1] == 0  # empty segment: 0 / 0
    assert out[1][2] == 1 and out[0][2] == out[2][1]  # one-token segment: its sum is that row's nll
    assert out[2][0] == 0 and out[2][-1] == 0  # ignored first / last rows
    assert (out[2][targets != IGNORE] > 0).all()


@pytest.mark.parametrize("path", FAST_PATHS + ["triton_3split"])
def test_large_magnitude_logits(path):
    # hidden * 50 puts logits in the hundreds: a naive exp would overflow; the online max must carry it.
    T, H, V, S = 33, 40, 700, 4
    hidden, weight, targets, seg = make_batch(T, H, V, S, scale=50.0, seed=1)
    out = PATHS[path](hidden, weight, targets, seg, S, return_row_nll=True)
    ref = reference(hidden, weight, targets, seg, S)
    zmax = (hidden.double() @ weight.double().T).abs().max().item()
    assert zmax > 200
    assert torch.isfinite(out[2]).all()
    # fp32 logits of magnitude zmax carry ~zmax * 6e-8 absolute error each
    torch.testing.assert_close(out[2].double(), ref[2], rtol=1e-5, atol=zmax * 1e-6)
    torch.testing.assert_close(out[0].double(), ref[0], rtol=1e-5, atol=zmax * 1e-5)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("softcap,logit_scale,use_bias", [(None, 0.37, False), (5.0, 1.0, False), (None, 1.0, True),
                                                          (30.0, 2.5, True)])
def test_softcap_scale_bias(path, softcap, logit_scale, use_bias):
    T, H, V, S = 29, 50, 613, 4
    hidden, weight, targets, seg = make_batch(T, H, V, S, seed=2, scale=3.0)
    bias = torch.randn(V, generator=torch.Generator().manual_seed(3)) if use_bias else None
    kw = dict(bias=bias, logit_scale=logit_scale, softcap=softcap)
    out = PATHS[path](hidden, weight, targets, seg, S, return_row_nll=True, **kw)
    assert_close_to_reference(out, reference(hidden, weight, targets, seg, S, **kw), torch.float32)
    if softcap is not None:  # the cap changes the answer (it is not silently skipped)
        plain = reference(hidden, weight, targets, seg, S, bias=bias, logit_scale=logit_scale)
        assert (plain[2] - out[2].double()).abs().max() > 1e-2


@pytest.mark.parametrize("path", FAST_PATHS)
def test_tied_head(path):
    # The head is the embedding matrix (a Parameter that requires grad): scoring must not build a graph or copy it.
    T, V, H, S = 26, 500, 48, 3
    emb = torch.nn.Embedding(V, H)
    tokens = torch.randint(0, V, (T + 1,), generator=torch.Generator().manual_seed(4))
    hidden = emb(tokens[:-1]).detach() + 0.1 * torch.randn(T, H)
    targets, seg = tokens[1:].clone(), torch.arange(T) % S
    targets[0] = IGNORE
    out = PATHS[path](hidden, emb.weight, targets, seg, S, return_row_nll=True)
    assert not any(t.requires_grad for t in out)
    assert_close_to_reference(out, reference(hidden, emb.weight.detach(), targets, seg, S), torch.float32)


@pytest.mark.parametrize("path", FAST_PATHS + ["triton_3split"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_row_index_compaction(path, index_dtype):
    # Scoring only the listed rows equals scoring every row with the others ignored.
    T, H, V, S = 50, 36, 900, 5
    hidden, weight, targets_full, seg_full = make_batch(T, H, V, S, seed=5)
    g = torch.Generator().manual_seed(6)
    row_index = torch.randperm(T, generator=g)[:19].sort().values.flip(0)  # unsorted order on purpose
    keep = torch.zeros(T, dtype=torch.bool)
    keep[row_index] = True
    masked_targets = torch.where(keep, targets_full, torch.full_like(targets_full, IGNORE))
    full = PATHS[path](hidden, weight, masked_targets, seg_full, S, return_row_nll=True)
    comp = PATHS[path](hidden, weight, targets_full[row_index], seg_full[row_index], S,
                       row_index=row_index.to(index_dtype), return_row_nll=True)
    torch.testing.assert_close(comp[1], full[1], rtol=0, atol=0)
    torch.testing.assert_close(comp[2], full[2][row_index], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(comp[0], full[0], rtol=1e-6, atol=1e-4)
    ref = reference(hidden, weight, targets_full[row_index], seg_full[row_index], S, row_index=row_index)
    assert_close_to_reference(comp, ref, torch.float32)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_strided_inputs(path):
    # Non-contiguous hidden (a column slice) and a weight stored transposed ([H, V] memory, [V, H] view).
    T, H, V, S = 21, 40, 333, 3
    hidden, weight, targets, seg = make_batch(T, H, V, S, seed=7)
    hidden_s = torch.cat([hidden, torch.randn(T, 9)], dim=1)[:, :H]
    weight_t = weight.T.contiguous().T
    assert not hidden_s.is_contiguous() and not weight_t.is_contiguous()
    out = PATHS[path](hidden_s, weight_t, targets, seg, S, return_row_nll=True)
    assert_close_to_reference(out, reference(hidden, weight, targets, seg, S), torch.float32)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_degenerate_sizes(path):
    hidden, weight, targets, seg = make_batch(10, 20, 100, 3, seed=8)
    # no scored rows
    s, c, r = PATHS[path](hidden, weight, targets[:0], seg[:0], 3, row_index=torch.arange(0), return_row_nll=True)
    assert s.tolist() == [0, 0, 0] and c.tolist() == [0, 0, 0] and r.numel() == 0
    # every target ignored
    s, c = PATHS[path](hidden, weight, torch.full_like(targets, IGNORE), seg, 3)
    assert s.tolist() == [0, 0, 0] and c.tolist() == [0, 0, 0]
    # no segments, but row NLLs asked for
    s, c, r = PATHS[path](hidden, weight, targets, seg * 0, 0, return_row_nll=True)
    assert s.numel() == 0 and c.numel() == 0
    torch.testing.assert_close(r.double(), reference(hidden, weight, targets, seg * 0, 1)[2], rtol=1e-5, atol=1e-4)
    # one row, one segment
    s, c = PATHS[path](hidden[:1], weight, targets[1:2], seg[:1] * 0, 1)
    ref = reference(hidden[:1], weight, targets[1:2], seg[:1] * 0, 1)
    assert c.item() == 1
    torch.testing.assert_close(s.double(), ref[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["torch_chunked", "triton_3split"])
def test_bitwise_repeatable(path):
    T, H, V, S = 40, 48, 800, 5
    hidden, weight, targets, seg = make_batch(T, H, V, S, torch.float16, seed=9)
    first = PATHS[path](hidden, weight, targets, seg, S, return_row_nll=True)
    for _ in range(2):
        again = PATHS[path](hidden, weight, targets, seg, S, return_row_nll=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_paths_agree_with_each_other():
    # Triton (interpreter) and PyTorch paths on the same inputs: both fp32 after the matmul, so they agree tightly.
    T, H, V, S = 37, 64, 1025, 4
    hidden, weight, targets, seg = make_batch(T, H, V, S, torch.bfloat16, seed=10)
    a = segment_nll_torch(hidden, weight, targets, seg, S, return_row_nll=True)
    b = segment_nll_triton(hidden, weight, targets, seg, S, return_row_nll=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


def test_bf16_interpreter_upcast_is_needed(monkeypatch):
    # Documents the interpreter limitation the UPCAST flag works around: with bf16 operands fed to tl.dot as they
    # are, the interpreter's answer is wrong. If a future triton fixes this, this test says so (and UPCAST can go).
    T, H, V, S = 16, 32, 64, 1
    hidden, weight, targets, seg = make_batch(T, H, V, S, torch.bfloat16, seed=11)
    ref = reference(hidden, weight, targets, seg, S)[2]
    good = segment_nll_triton(hidden, weight, targets, seg, S, return_row_nll=True)[2]
    torch.testing.assert_close(good.double(), ref, rtol=1e-4, atol=5e-4)
    monkeypatch.setattr(snt, "_needs_upcast", lambda dtype: False)  # feed bf16 to tl.dot as the GPU path does
    bad = segment_nll_triton(hidden, weight, targets, seg, S, return_row_nll=True)[2]
    assert not torch.allclose(bad.double(), ref, rtol=1e-2, atol=1e-2), "bf16 tl.dot now correct in the interpreter"


def test_torch_path_never_builds_full_logits(monkeypatch):
    # The PyTorch path must stay within its (rows x vocab) chunk for any V; record every logits block it builds.
    shapes = []
    real = snt_torch._logits_fp32

    def spy(h, w):
        shapes.append((h.shape[0], w.shape[0]))
        return real(h, w)

    monkeypatch.setattr(snt_torch, "_logits_fp32", spy)
    hidden, weight, targets, seg = make_batch(30, 16, 1000, 3, seed=12)
    segment_nll_torch(hidden, weight, targets, seg, 3, chunk_rows=8, chunk_vocab=256)
    assert max(r for r, _ in shapes) <= 8 and max(v for _, v in shapes) <= 256
    assert sum(r * v for r, v in shapes) == 30 * 1000  # every logit computed exactly once


def test_segment_sum_deterministic_and_exact():
    g = torch.Generator().manual_seed(13)
    vals = torch.rand(1000, generator=g) * 10
    ids = torch.randint(0, 17, (1000,), generator=g)
    ref = torch.zeros(17, dtype=torch.float64).index_add_(0, ids, vals.double())
    out = segment_sum(vals, ids, 17)
    torch.testing.assert_close(out.double(), ref, rtol=1e-7, atol=0)
    assert torch.equal(out, segment_sum(vals, ids, 17))


def test_dispatcher_env_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(snt_torch, "segment_nll_torch", lambda *a, **k: calls.append("torch") or "t")
    monkeypatch.setattr(snt, "segment_nll_triton", lambda *a, **k: calls.append("triton") or "x")
    hidden, weight, targets, seg = make_batch(8, 16, 50, 3)
    args = (hidden, weight, targets, seg, 3)

    monkeypatch.delenv("SAPO_KERNEL", raising=False)
    assert sn.segment_nll(*args) == "t"  # CPU tensors default to PyTorch
    monkeypatch.setenv("SAPO_KERNEL", "triton")
    assert sn.segment_nll(*args) == "x"  # forced (TRITON_INTERPRET=1 is set)
    monkeypatch.setenv("SAPO_KERNEL", "torch")
    assert sn.segment_nll(*args) == "t"
    monkeypatch.setenv("SAPO_KERNEL", "auto")
    assert sn.segment_nll(*args) == "t"
    assert calls == ["torch", "triton", "torch", "torch"]
    monkeypatch.setenv("SAPO_KERNEL", "cuda-please")
    with pytest.raises(ValueError):
        sn.segment_nll(*args)
    monkeypatch.setenv("SAPO_KERNEL", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError):
        sn.segment_nll(*args)


def test_dispatcher_end_to_end(monkeypatch):
    # The real functions behind the switch, and the package-level export, give the same numbers.
    hidden, weight, targets, seg = make_batch(20, 24, 300, 4, seed=14)
    ref = reference(hidden, weight, targets, seg, 4)
    monkeypatch.setenv("SAPO_KERNEL", "triton")
    out = kernels.segment_nll(hidden, weight, targets, seg, 4)
    assert len(out) == 2
    assert_close_to_reference(out + (segment_nll_triton(hidden, weight, targets, seg, 4, return_row_nll=True)[2],),
                              ref, torch.float32)
    monkeypatch.setenv("SAPO_KERNEL", "torch")
    out = segment_nll(hidden, weight, targets, seg, 4)
    assert len(out) == 2
    assert_close_to_reference(out + (segment_nll_torch(hidden, weight, targets, seg, 4, return_row_nll=True)[2],),
                              ref, torch.float32)


@settings(max_examples=15, deadline=None)
@given(
    T=st.integers(1, 40), H=st.integers(1, 70), V=st.integers(2, 700), S=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    use_row_index=st.booleans(), num_splits=st.integers(1, 4), ignore_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2 ** 16),
)
def test_property_random_shapes(T, H, V, S, dtype, use_row_index, num_splits, ignore_frac, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (2 * torch.randn(T, H, generator=g)).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    if use_row_index:
        row_index = torch.randint(0, T, (int(torch.randint(0, 2 * T, (1,), generator=g)),), generator=g)
    else:
        row_index = None
    R = T if row_index is None else row_index.numel()
    targets = torch.randint(0, V, (R,), generator=g)
    targets[torch.rand(R, generator=g) < ignore_frac] = IGNORE
    seg = torch.randint(0, S, (R,), generator=g)
    ref = reference(hidden, weight, targets, seg, S, row_index=row_index)
    for out in (segment_nll_triton(hidden, weight, targets, seg, S, row_index=row_index, return_row_nll=True,
                                   num_splits=num_splits),
                segment_nll_torch(hidden, weight, targets, seg, S, row_index=row_index, return_row_nll=True,
                                  chunk_rows=9, chunk_vocab=97)):
        # logits here reach |z| ~ 2 * sqrt(H) * 4: scale the absolute tolerance with them
        rtol, atol = TOL[dtype]
        atol = atol * max(1.0, H ** 0.5)
        torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
        torch.testing.assert_close(out[2].double(), ref[2], rtol=rtol, atol=atol)
        torch.testing.assert_close(out[0].double(), ref[0], rtol=rtol, atol=atol * max(1, R))

