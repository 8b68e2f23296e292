"""The launch plan of the Triton path: grouped program order, vocabulary splits, the wave-filling split choice.

The kernel runs in the interpreter (conftest sets TRITON_INTERPRET=1) on tiny shapes, against the float64 reference of
tests/test_kernels.py; the config is forced so that the shapes cross group boundaries and ragged last groups.
"""

import math

import pytest
import torch

from kernels import segment_nll_triton as snt
from test_kernels import assert_close_to_reference, make_batch, reference

BASE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=1)


def run(hidden, weight, targets, seg, S, **kw):
    row_nll = torch.full((targets.shape[0],), float("nan"))
    out = snt.segment_nll_triton(hidden, weight, targets, seg, S, row_nll_out=row_nll, **kw)
    return out + (row_nll,)


@pytest.mark.parametrize("R,group_m,num_splits", [
    (80, 2, 3),   # 5 row tiles in groups of 2, 2, 1: a ragged last group
    (80, 4, 2),   # groups of 4 and 1
    (80, 8, 4),   # one group, smaller than GROUP_M
    (64, 2, 5),   # 4 row tiles: whole groups only
    (3, 2, 4),    # one short row tile, more splits than rows
])
@pytest.mark.parametrize("flatten", [False, True])
def test_grouped_order_and_splits(R, group_m, num_splits, flatten):
    H, V, S = 32, 300, 4  # V = 4 full blocks + a partial one: the splits hold uneven block counts
    hidden, weight, targets, seg = make_batch(R, H, V, S, torch.float16, seed=R + group_m)
    out = run(hidden, weight, targets, seg, S, num_splits=num_splits,
              config=dict(BASE, GROUP_M=group_m, FLATTEN=flatten))
    assert_close_to_reference(out, reference(hidden, weight, targets, seg, S), torch.float16)


def test_every_row_tile_ignored_but_one():
    # Tiles whose rows are all ignored skip the matmul; the one live tile sits in the middle of a group.
    R, H, V, S = 64, 32, 200, 2
    hidden, weight, targets, seg = make_batch(R, H, V, S, seed=3)
    targets[:] = -100
    targets[20:23] = torch.tensor([0, 199, 64])  # first column, last column, a block boundary
    out = run(hidden, weight, targets, seg, S, num_splits=3, config=dict(BASE, GROUP_M=2))
    assert_close_to_reference(out, reference(hidden, weight, targets, seg, S), torch.float32)
    assert out[1].sum() == 3


def wave_efficiency(tiles, splits, vblocks, slots):
    splits = math.ceil(vblocks / math.ceil(vblocks / splits))
    grid = tiles * splits
    return grid / (math.ceil(grid / slots) * slots)


@pytest.mark.parametrize("R,V,sms,ctas", [(2048, 151936, 132, 2), (16384, 151936, 132, 2), (16384, 49152, 132, 2),
                                          (65536, 151936, 132, 2), (2048, 151936, 108, 1), (16384, 128256, 108, 1)])
def test_split_choice_fills_waves(R, V, sms, ctas):
    # the real heads: at least 90% of the last wave busy, and at most GROUP_M row tiles resident at once
    tiles, vblocks, slots = math.ceil(R / 128), math.ceil(V / 128), sms * ctas
    s = snt.choose_num_splits(tiles, vblocks, slots, group_m=8)
    assert 1 <= s <= vblocks
    assert wave_efficiency(tiles, s, vblocks, slots) >= snt.MIN_WAVE_EFFICIENCY
    assert s * min(8, tiles) >= slots


def test_split_choice_small_and_odd():
    # fewer blocks than slots: every block its own split; and the result always stays within the blocks
    assert snt.choose_num_splits(1, 5, 264, 8) == 5
    for tiles in range(1, 40):
        for vblocks in (1, 2, 7, 33, 100):
            s = snt.choose_num_splits(tiles, vblocks, 12, 3)
            assert 1 <= s <= vblocks
    # the plan never leaves a split empty
    for V in (1, 63, 64, 65, 1000):
        for n in range(1, 20):
            tiles, bps, ns = snt.plan_launch(10, V, 16, 64, n)
            assert (ns - 1) * bps < math.ceil(V / 64) <= ns * bps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("use_row_index", [False, True])
def test_tma_descriptor_path(dtype, use_row_index, monkeypatch):
    # USE_TMA: gathered rows and the head read through tensor descriptors (zero-filled past R, V and H); ragged
    # shapes so that every tile edge is crossed. The interpreter runs the descriptor loads on CPU tensors.
    T, H, V, S = 45, 72, 333, 4
    hidden, weight, targets, seg = make_batch(T, H, V, S, dtype, seed=21)
    made = []  # the descriptors really are built (and not silently skipped)
    real = snt.TensorDescriptor.from_tensor
    monkeypatch.setattr(snt.TensorDescriptor, "from_tensor",
                        staticmethod(lambda t, block: made.append(tuple(block)) or real(t, block)))
    kw = {}
    if use_row_index:
        kw["row_index"] = torch.tensor([40, 3, 3, 17, 0, 44, 21, 8, 30, 12, 5, 39, 26, 1, 33, 9, 14, 2])
        targets, seg = targets[kw["row_index"]], seg[kw["row_index"]]
        targets[3] = 7
    out = run(hidden, weight, targets, seg, S, num_splits=2, config=dict(BASE, GROUP_M=2, USE_TMA=True), **kw)
    assert_close_to_reference(out, reference(hidden, weight, targets, seg, S, **kw), dtype)
    assert made == [(16, 32), (64, 32)]
    # a head TMA cannot tile (transposed storage) falls back to pointer loads, same answer
    weight_t = weight.T.contiguous().T
    out_t = run(hidden, weight_t, targets, seg, S, num_splits=2, config=dict(BASE, GROUP_M=2, USE_TMA=True), **kw)
    torch.testing.assert_close(out_t[2], out[2], rtol=1e-5, atol=1e-5)
    assert len(made) == 2


@pytest.mark.parametrize("name", sorted(snt.SM90_TWO_CTA_CONFIGS))
def test_two_cta_candidates_as_launched(name, monkeypatch):
    # The sm_90 tuning candidates with their real tiles (128x128, K-step 64), TMA loads and FLATTEN as configured:
    # 3 row tiles (a ragged last one), 3 vocabulary blocks (a partial last one) in 2 splits, H = 2 K-steps + a tail.
    T, H, V, S = 300, 136, 300, 5
    hidden, weight, targets, seg = make_batch(T, H, V, S, torch.float32, seed=5)
    cfg = dict(snt.SM90_TWO_CTA_CONFIGS[name], USE_TMA=True)
    out = run(hidden, weight, targets, seg, S, num_splits=2, config=cfg)
    assert_close_to_reference(out, reference(hidden, weight, targets, seg, S), torch.float32)
    # the launcher hands the config's GROUP_M and residency to the split choice (on a GPU: slots = SMs x CTAS_PER_SM)
    seen = []
    real = snt._default_num_splits
    monkeypatch.setattr(snt, "_default_num_splits", lambda *a: seen.append(a[3:]) or real(*a))
    again = run(hidden, weight, targets, seg, S, config=cfg)
    assert_close_to_reference(again, reference(hidden, weight, targets, seg, S), torch.float32)
    assert seen == [(cfg["GROUP_M"], cfg["CTAS_PER_SM"])]

    class Props:
        major, multi_processor_count = 9, 132
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a, **k: Props)
    tiles, vblocks = 128, math.ceil(151936 / 128)  # 16k rows of Qwen3-8B's head
    got = real(tiles, vblocks, torch.device("cuda"), cfg["GROUP_M"], cfg["CTAS_PER_SM"])
    assert got == snt.choose_num_splits(tiles, vblocks, 132 * cfg["CTAS_PER_SM"], cfg["GROUP_M"])
    assert wave_efficiency(tiles, got, vblocks, 132 * cfg["CTAS_PER_SM"]) >= snt.MIN_WAVE_EFFICIENCY
