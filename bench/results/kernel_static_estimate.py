"""Static launch figures of _partials_kernel before and after the scheduling work (no GPU needed):

    python bench/results/kernel_static_estimate.py     # writes kernel_static_sm90_sm80.{json,md} next to it

Registers / spills / shared memory are the ptxas figures of the AOT compiles (kernel_static_aot_before.txt: the
shared tool on the code before; kernel_static_aot_after_pointer.txt: the tool on the pointer-load path now;
tests/test_kernel_compile.py for the TMA path that sm_90 launches and the two-CTA candidates). They are copied in
below rather than recompiled.

Traffic model, per launch, bf16 (2 bytes per element):
- L2 -> SM: every program re-reads its [BLOCK_M, H] hidden tile for each vocabulary block and each [BLOCK_N, H]
  weight block once: tiles * vblocks * (BLOCK_M + BLOCK_N) * H * 2 = 2 R V H (1/BLOCK_N + 1/BLOCK_M). The program
  order does not change it; only the tile shape does.
- HBM -> L2: the programs resident at once span `rt` row tiles (row tile fastest before: min(tiles, slots); grouped
  after: the GROUP_M rows of a group times the groups the resident window touches). If their hidden rows
  (rt * BLOCK_M * H * 2) fit in half the L2 (the other half streams weights), hidden rows come from HBM once
  (R H 2), else once per vocabulary block (R H 2 * vblocks, the upper bound). The co-resident programs of a split
  read each weight block together, so the head is read once per resident window of row tiles: V H 2 * ceil(tiles /
  rt). Partials (3 fp32 per row and split) are small and left out.
"""

import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
os.environ.pop("TRITON_INTERPRET", None)
from kernels import segment_nll_triton as snt  # noqa: E402

GPUS = {90: dict(name="H100 SXM", sms=132, l2=50 * 2 ** 20), 80: dict(name="A100", sms=108, l2=40 * 2 ** 20)}
HEADS = {"qwen3-8b": (4096, 151936), "qwen3-0.6b": (1024, 151936), "smollm2-135m": (576, 49152)}
ROWS = (2048, 16384)

# (label, cc, config, order, ctas/SM, compile figures for bf16 from the AOT outputs)
SETUPS = [
    ("before", 90, dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=None, splits="before"), "row-fastest", 1,
     dict(regs=192, spill_bytes=0, smem=98304, loads="pointer")),
    ("after (default: TMA, 128x256, GROUP_M=16, FLATTEN)", 90, snt.GPU_CONFIGS[9], "grouped", snt.CTAS_PER_SM[9],
     dict(regs=232, spill_bytes=0, smem=147480, loads="TMA")),
    ("after, pointer loads (heads TMA cannot tile)", 90, snt.GPU_CONFIGS[9], "grouped", snt.CTAS_PER_SM[9],
     dict(regs=254, spill_bytes=0, smem=147456, loads="pointer")),
    ("after, two_warpgroups_128regs (2 CTAs/SM; measured 43 ms vs 30 ms)", 90,
     snt.SM90_TWO_CTA_CONFIGS["two_warpgroups_128regs"], "grouped", 2,
     dict(regs=102, spill_bytes=0, smem=98328, loads="TMA")),
    ("after, one_warpgroup (2 CTAs/SM; not timed)", 90, snt.SM90_TWO_CTA_CONFIGS["one_warpgroup"], "grouped", 2,
     dict(regs=230, spill_bytes=0, smem=98840, loads="TMA")),
    ("before", 80, dict(BLOCK_M=128, BLOCK_N=128, GROUP_M=None, splits="before"), "row-fastest", 1,
     dict(regs=255, spill_bytes=0, smem=65536, loads="pointer")),
    ("after (default)", 80, snt.GPU_CONFIGS[8], "grouped", snt.CTAS_PER_SM[8],
     dict(regs=206, spill_bytes=0, smem=32768, loads="pointer")),
]


L2_FLOOR_NOTE = """\
L2-to-SM traffic is 2 R V H (1/BLOCK_M + 1/BLOCK_N) whatever the program order, so only a larger tile cuts it. The
fp32 accumulator of one CTA's tile lives in registers: 128x256 takes 128 KiB, half of an SM's 256 KiB register file,
and 256x256 would take all of it, so 128x256 (0.75x of the 128x128 tiles before) is the largest tile one CTA can
hold. A quarter of before needs 512x512 tiles in effect: a cluster of CTAs sharing each operand tile through TMA
multicast (Triton's num_ctas). Triton 3.7 does not compile this kernel with num_ctas=2 (TritonGPUPlanCTAPass:
"parent layout must have at least rank >= 2"), so that target is out of reach here. The traffic the 128x128 row-fastest
order really wasted was HBM: hidden rows re-read per vocabulary block, 160 GB -> 10 GB at 16k rows.
"""


def before_splits(tiles, vblocks, sms):
    return max(1, min(vblocks, math.ceil(2 * sms / tiles)))  # the old _default_num_splits


def figures(cc, cfg, order, ctas, R, H, V):
    gpu = GPUS[cc]
    BM, BN = cfg["BLOCK_M"], cfg["BLOCK_N"]
    slots = gpu["sms"] * ctas
    tiles, vblocks = math.ceil(R / BM), math.ceil(V / BN)
    if order == "row-fastest":
        splits = before_splits(tiles, vblocks, gpu["sms"])
    else:
        splits = snt.choose_num_splits(tiles, vblocks, slots, cfg["GROUP_M"])
    tiles, bps, splits = snt.plan_launch(R, V, BM, BN, splits)
    grid = tiles * splits
    waves = grid / slots
    if order == "row-fastest":
        rt = min(tiles, slots)
    else:
        gr = min(cfg["GROUP_M"], tiles)
        rt = min(tiles, gr * math.ceil(slots / (gr * splits)))
    hidden_ws = rt * BM * H * 2
    hidden_hbm = R * H * 2 * (1 if hidden_ws <= gpu["l2"] / 2 else vblocks)
    weight_hbm = V * H * 2 * math.ceil(tiles / rt)
    return dict(R=R, H=H, V=V, splits=splits, grid=grid, slots=slots, waves=round(waves, 2),
                wave_efficiency=round(grid / (math.ceil(waves) * slots), 3), resident_row_tiles=rt,
                resident_hidden_mib=round(hidden_ws / 2 ** 20, 1),
                l2_to_sm_gb=round(tiles * vblocks * (BM + BN) * H * 2 / 1e9, 2),
                hbm_gb=round((hidden_hbm + weight_hbm) / 1e9, 2))


def main():
    out = []
    for label, cc, cfg, order, ctas, comp in SETUPS:
        for head, (H, V) in HEADS.items():
            for R in ROWS:
                out.append(dict(setup=label, target=f"sm_{cc}", gpu=GPUS[cc]["name"], head=head, ctas_per_sm=ctas,
                                tile=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}", **comp,
                                **figures(cc, cfg, order, ctas, R, H, V)))
    with open(os.path.join(HERE, "kernel_static_sm90_sm80.json"), "w") as f:
        json.dump(out, f, indent=1)
    cols = ["target", "setup", "head", "R", "tile", "loads", "regs", "spill_bytes", "smem", "ctas_per_sm", "splits",
            "grid", "waves", "wave_efficiency", "resident_row_tiles", "l2_to_sm_gb", "hbm_gb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in out]
    with open(os.path.join(HERE, "kernel_static_sm90_sm80.md"), "w") as f:
        f.write("# _partials_kernel: static launch figures, before / after (bf16)\n\n"
                "Generated by `python bench/results/kernel_static_estimate.py`; the model is in its docstring. "
                "regs / spill / smem: ptxas on AOT compiles (no GPU); waves = grid / (SMs x CTAs per SM); "
                "traffic in GB per launch (estimates, not measurements).\n\n" + "\n".join(lines) + "\n\n"
                + L2_FLOOR_NOTE)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
