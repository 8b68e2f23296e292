"""Both Triton kernels compile for real NVIDIA targets -- no GPU, no driver -- with tensor cores and no spills.

triton.compile with an explicit GPUTarget (sm_80 = A100, sm_90 = H100) runs the whole pipeline down to a cubin with
the ptxas that ships with triton. That catches what the interpreter lets through (loop-carried type mismatches,
constexpr misuse, shared memory over the limit) and checks the figures the launch plan relies on:
- the 16-bit tl.dot lowers to tensor-core instructions: wgmma.mma_async on sm_90, mma.sync on sm_80;
- ptxas reports no register spills;
- registers, threads and shared memory allow the CTAS_PER_SM the plan counts wave slots with.

Cases: sm_80 / sm_90 (with TMA descriptor loads, as launched there, and without) x bf16 / fp16 x the LM heads of
SmolLM2-135M (576 x 49152), Qwen3-0.6B (1024 x 151936) and Qwen3-8B (4096 x 151936); and the sm_90 two-CTA candidates
(SM90_TWO_CTA_CONFIGS) in bf16 / fp16, which must reach the two CTAs per SM they declare. H, V and R are runtime
arguments: a head changes the binary only through Triton's specialisation (divisibility of ints by 16) and EVEN_K, so
the heads share binaries and each distinct one is compiled once (the compile cache below is keyed by everything that
reaches triton.compile).

The compiler runs in a subprocess without TRITON_INTERPRET (conftest sets it for this process, and with it set
@triton.jit builds interpreter wrappers that cannot be compiled).
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = {"smollm2-135m": (576, 49152), "qwen3-0.6b": (1024, 151936), "qwen3-8b": (4096, 151936)}
TARGETS = (80, 90)
DTYPES = ("bf16", "fp16")
REGS_PER_SM, SMEM_PER_SM = 65536, {80: 164 * 1024, 90: 228 * 1024}
RESERVED_SMEM_PER_CTA = 1024  # sm_80+: reserved by the system for every resident CTA

COMPILE_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import segment_nll_triton as snt

HEADS, TARGETS, DTYPES = json.loads(sys.argv[1])
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
cache = {}

def compile_(kernel, args, options, cc):
    '''args: name -> (type, value); type "constexpr" or a Triton type. Ints and pointers get the divisibility-by-16
    hint the JIT would give them (pointers from torch are 16-byte aligned).'''
    names = list(kernel.arg_names)
    sig = {n: args[n][0] for n in names}
    consts = {(names.index(n),): v for n, (t, v) in args.items() if t == "constexpr"}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, (t, v) in args.items()
             if t.startswith("*") or (t == "i32" and v % 16 == 0 and v != 0)}  # (descriptors: none)
    # ints equal to 1 become constexprs in the JIT too
    for n, (t, v) in args.items():
        if t == "i32" and v == 1:
            sig[n] = "constexpr"
            consts[(names.index(n),)] = 1
    key = (kernel.__name__, cc, json.dumps(sig), repr(sorted(consts.items())), repr(sorted(attrs.items())),
           json.dumps(options, sort_keys=True))
    if key in cache:
        return cache[key]
    ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", cc, 32), options=options)
    ptx = ck.asm["ptx"]
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        open(p, "w").write(ptx)
        log = subprocess.run([PTXAS, "-v", f"--gpu-name={arch}", p, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True).stderr
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    cache[key] = dict(regs=int(re.search(r"Used (\d+) registers", log).group(1)),
                      spill=int(spill.group(1)) + int(spill.group(2)) if spill else -1,
                      smem=ck.metadata.shared, warps=ck.metadata.num_warps,
                      wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma=len(re.findall(r"\bmma\.sync", ptx)),
                      tma_loads=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)))
    return cache[key]

def partials(cc, dt, H, V, R, cfg, tma):
    cfg = dict(cfg)
    BM, BN, BK = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    group_m, flatten = cfg.pop("GROUP_M"), cfg.pop("FLATTEN", False)
    nrt, bps, ns = snt.plan_launch(R, V, BM, BN, snt.choose_num_splits(-(-R // BM), -(-V // BN), 132, group_m))
    p = "*" + dt
    # TMA (the launcher's choice on sm_90+): tensor descriptors over the gathered rows and the head
    h_ty, w_ty = (f"tensordesc<{dt}[{BM}, {BK}]>", f"tensordesc<{dt}[{BN}, {BK}]>") if tma else (p, p)
    args = dict(hidden_ptr=(h_ty, 0), weight_ptr=(w_ty, 0), bias_ptr=(p, 0), row_index_ptr=("*i64", 0),
                targets_ptr=("*i64", 0), mx_ptr=("*fp32", 0), se_ptr=("*fp32", 0), zt_ptr=("*fp32", 0),
                R=("i32", R), V=("i32", V), H=("i32", H), stride_ht=("i32", H), stride_hh=("i32", 1),
                stride_wv=("i32", H), stride_wh=("i32", 1), num_row_tiles=("i32", nrt), blocks_per_split=("i32", bps),
                scale=("fp32", 1.0), softcap2=("fp32", 1.0), ignore_index=("i32", -100),
                HAS_ROW_INDEX=("constexpr", not tma), HAS_BIAS=("constexpr", False), HAS_SOFTCAP=("constexpr", False),
                UPCAST=("constexpr", False), DOT_PRECISION=("constexpr", "tf32"), BLOCK_M=("constexpr", BM),
                BLOCK_N=("constexpr", BN), BLOCK_K=("constexpr", BK), GROUP_M=("constexpr", group_m),
                EVEN_K=("constexpr", H % BK == 0), USE_TMA=("constexpr", tma),
                FLATTEN=("constexpr", flatten))
    return compile_(snt._partials_kernel, args, cfg, cc)

def reduce_(cc, R, num_splits):
    args = dict(mx_ptr=("*fp32", 0), se_ptr=("*fp32", 0), zt_ptr=("*fp32", 0), targets_ptr=("*i64", 0),
                order_ptr=("*i64", 0), bounds_ptr=("*i64", 0), row_nll_ptr=("*fp32", 0), sum_ptr=("*fp32", 0),
                count_ptr=("*i64", 0), R=("i32", R), num_splits=("i32", num_splits), ignore_index=("i32", -100),
                BLOCK_R=("constexpr", 128))
    return compile_(snt._segment_reduce_kernel, args, dict(num_warps=4), cc)

out = []
for cc in TARGETS:
    for dt in DTYPES:
        for head, (H, V) in HEADS.items():
            # the default config as launched (TMA on sm_90), and pointer loads (other heads, or USE_TMA=False)
            for tma in ([True, False] if cc >= 90 else [False]):
                res = partials(cc, dt, H, V, 16384, snt.GPU_CONFIGS[cc // 10], tma)
                out.append(dict(kernel="partials", config="default", tma=tma, cc=cc, dtype=dt, head=head, **res))
    out.append(dict(kernel="reduce", config="default", cc=cc, dtype="fp32", head="-", **reduce_(cc, 16384, 9)))
for name, cfg in snt.SM90_TWO_CTA_CONFIGS.items():  # the two-CTA candidates, loads as the launcher would pick
    cfg = dict(cfg)
    want, tma = cfg.pop("CTAS_PER_SM"), cfg.pop("USE_TMA", True)
    for dt in DTYPES:
        res = partials(90, dt, 4096, 151936, 16384, cfg, tma)
        out.append(dict(kernel="partials", config=name, want_ctas=want, tma=tma, cc=90, dtype=dt, head="qwen3-8b",
                        **res))
print("RESULT " + json.dumps(out))
print("distinct binaries:", len(cache), file=sys.stderr)
"""


def ctas_per_sm(regs, warps, smem, cc):
    threads = 32 * warps
    regs_alloc = -(-regs * 32 // 256) * 256 // 32  # registers are allocated per warp in units of 256
    return min(REGS_PER_SM // (regs_alloc * threads), SMEM_PER_SM[cc] // (smem + RESERVED_SMEM_PER_CTA),
               2048 // threads)


@pytest.fixture(scope="module")
def compiled():
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"no ptxas bundled with triton at {ptxas}: cannot compile for NVIDIA targets here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps([HEADS, TARGETS, DTYPES])], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_every_case_compiled(compiled):
    cases = {(r["cc"], r["dtype"], r["head"], r["tma"]) for r in compiled
             if r["kernel"] == "partials" and r["config"] == "default"}
    assert cases == {(cc, dt, head, tma) for cc in TARGETS for dt in DTYPES for head in HEADS
                     for tma in ((True, False) if cc >= 90 else (False,))}
    assert {r["cc"] for r in compiled if r["kernel"] == "reduce"} == set(TARGETS)
    from kernels import segment_nll_triton as snt

    assert {(r["config"], r["dtype"]) for r in compiled if r["config"] != "default"} == {
        (name, dt) for name in snt.SM90_TWO_CTA_CONFIGS for dt in DTYPES}


@pytest.mark.parametrize("cc", TARGETS)
def test_partials_uses_tensor_cores_without_spills(compiled, cc):
    from kernels import segment_nll_triton as snt

    for r in (r for r in compiled if r["kernel"] == "partials" and r["cc"] == cc):
        case = f"sm_{cc} {r['dtype']} {r['head']} {r['config']} tma={r['tma']}"
        assert r["spill"] == 0, f"{case}: {r['spill']} bytes of register spills"
        if cc == 90:
            assert r["wgmma"] > 0, f"{case}: no wgmma.mma_async in the PTX"
            assert (r["tma_loads"] > 0) == r["tma"], f"{case}: {r['tma_loads']} TMA loads in the PTX"
        else:
            assert r["mma"] > 0, f"{case}: no mma.sync in the PTX"
        want = snt.CTAS_PER_SM[cc // 10] if r["config"] == "default" else r["want_ctas"]
        got = ctas_per_sm(r["regs"], r["warps"], r["smem"], cc)
        assert got >= want, f"{case}: {got} resident CTAs per SM, the launch plan counts {want}"


def test_reduce_compiles_without_spills(compiled):
    for r in (r for r in compiled if r["kernel"] == "reduce"):
        assert r["spill"] == 0
