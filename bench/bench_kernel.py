"""Benchmark the fused LM head + per-segment NLL (kernels.segment_nll) against the usual ways of computing it.

    python bench/bench_kernel.py            # GPU: 3 real heads x 4k/16k/64k scored rows x response fraction 1.0/0.1
    python bench/bench_kernel.py --cpu      # CPU (also the fallback without CUDA): PyTorch providers, small sizes
    python bench/bench_kernel.py --out my.csv --heads qwen3-8b --rows 16384 --fractions 0.1

A script, not a test: it prints a table and writes a CSV (default bench/results/kernel_<device>.csv); it never
passes or fails on timings.

The batch mimics a packed scoring batch: sequences of SEQ_LEN tokens, each a prompt followed by a response holding
`fraction` of its tokens. Only response tokens are scored (R rows, listed in row_index); each sequence is one segment,
and segments are dealt round-robin to NUM_CANDIDATES candidates (segment s -> candidate s % NUM_CANDIDATES), whose
score is the mean over their segments of the per-segment mean NLL, lower is better.

Providers, all on the same tensors:
  naive          torch.mm over all T rows, .float(), F.cross_entropy(reduction='none', ignore_index), index_add_
  torch_chunked  kernels.segment_nll_torch.segment_nll_torch with row_index (ours, PyTorch path)
  liger_flce     liger-kernel LigerFusedLinearCrossEntropyLoss(reduction='none') on the R gathered rows
  cce            cut-cross-entropy linear_cross_entropy(reduction='none') on the R gathered rows
  ours_triton    kernels.segment_nll_triton.segment_nll_triton with row_index (the gather happens in the kernel)
  ours_triton[k=v;...]  the same with a config override (--ours-configs), for tuning on a GPU; ours_triton[NAME]
                 with a named two-CTA candidate of kernels.segment_nll_triton.SM90_TWO_CTA_CONFIGS
  mm_ceiling     bare torch.mm of the R gathered rows (no softmax at all): the practical ceiling
liger_flce, cce and mm_ceiling get the scored rows gathered once outside the timed region (hidden[row_index], the
same rows ours scores), so kernel is compared against kernel; they then reduce per segment with index_add_. Only
"naive" multiplies all T rows. TFLOP/s "useful" counts 2*R*H*V, "performed" 2*rows_computed*H*V, rows_computed being
the rows the provider really multiplies.

A provider that fails (any exception, OOM included) is recorded with its error in the status column and the sweep
goes on; every row is appended to the CSV (and flushed) as soon as it is measured.

Columns: median ms (triton.testing.do_bench on GPU; median of time.perf_counter repeats on CPU), TFLOP/s useful and
performed, peak extra memory (torch.cuda.max_memory_allocated above the inputs on GPU; not measured on CPU, where
tracemalloc does not see torch's allocator), max |row NLL - float64 reference| over the scored rows (over the first
REF_SAMPLE_ROWS of them when R is larger: `ref_rows`), and whether the top-1 candidate matches the float64 ranking
(only when the reference covers every row).
"""

import argparse
import csv
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.segment_nll_torch import segment_nll_torch  # noqa: E402

# ---- defaults -------------------------------------------------------------------------------------------------------
# LM heads (hidden size H, vocabulary V) of real models, as in their config.json (hidden_size, vocab_size)
GPU_HEADS = {"smollm2-135m": (576, 49152), "qwen3-0.6b": (1024, 151936), "llama-3.2-1b": (2048, 128256),
             "qwen3-8b": (4096, 151936)}
CPU_HEADS = {"cpu-256x8k": (256, 8192), "smollm-135m": (576, 49152)}
GPU_ROWS = [4096, 16384, 65536]
CPU_ROWS = [512, 2048]
FRACTIONS = [1.0, 0.1]
SEQ_LEN = 512
NUM_CANDIDATES = 8
IGNORE = -100
CPU_REPEATS = 3  # after the call that measured the errors (the warm-up)
CPU_MAX_GFLOP = 200  # on CPU, skip a provider call performing more than this (naive at fraction 0.1 is 10x the work)
REF_SAMPLE_ROWS = 4096  # float64 reference over at most this many scored rows (the first ones)


# ---- environment ----------------------------------------------------------------------------------------------------
def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name} ({torch.get_num_threads()} threads)"


def git_commit():
    if os.environ.get("SAPO_COMMIT"):  # a copy without .git (e.g. shipped to a lent GPU machine) says it here
        return os.environ["SAPO_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "not installed"


# ---- data -----------------------------------------------------------------------------------------------------------
def make_batch(R, fraction, H, V, dtype, device, seed=0):
    """Packed batch with R scored (response) rows; see the module docstring."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)  # the big tensors are drawn where they live
    resp_len = max(1, round(fraction * SEQ_LEN))
    n_seq = math.ceil(R / resp_len)
    T = n_seq * SEQ_LEN
    starts = torch.arange(n_seq) * SEQ_LEN + (SEQ_LEN - resp_len)  # response = the last resp_len tokens
    row_index = (starts[:, None] + torch.arange(resp_len)[None, :]).reshape(-1)[:R]
    seg_of_row = torch.arange(T) // SEQ_LEN
    # logits with standard deviation ~2: a realistic spread of per-token NLLs around log(V)
    hidden = torch.randn(T, H, generator=gd, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=gd, device=device) * (2.0 / math.sqrt(H))).to(dtype)
    targets_full = torch.full((T,), IGNORE, dtype=torch.long)
    targets_full[row_index] = torch.randint(0, V, (R,), generator=g)
    b = dict(hidden=hidden, weight=weight, row_index=row_index, targets=targets_full[row_index],
             segment_ids=seg_of_row[row_index], targets_full=targets_full, segment_ids_full=seg_of_row)
    b = {k: v.to(device) for k, v in b.items()}
    b["hidden_rows"] = b["hidden"][b["row_index"]]  # the scored rows, gathered once (for the other kernels)
    b.update(R=R, T=T, H=H, V=V, num_segments=n_seq)
    return b


@torch.no_grad()
def reference_row_nll(b, n_rows, chunk_rows=1024, chunk_vocab=16384):
    """float64 NLL of the first n_rows scored rows, chunked so that it fits at any size."""
    hidden, weight, row_index, targets = b["hidden"], b["weight"], b["row_index"], b["targets"]
    out = torch.empty(n_rows, dtype=torch.float64, device=hidden.device)
    for r0 in range(0, n_rows, chunk_rows):
        chunk_rows = min(chunk_rows, n_rows - r0)
        h = hidden[row_index[r0:r0 + chunk_rows]].double()
        t = targets[r0:r0 + chunk_rows]
        lse = torch.full((h.shape[0],), float("-inf"), dtype=torch.float64, device=h.device)
        z_t = (h * weight[t].double()).sum(1)
        for v0 in range(0, b["V"], chunk_vocab):
            lse = torch.logaddexp(lse, torch.logsumexp(h @ weight[v0:v0 + chunk_vocab].double().T, dim=1))
        out[r0:r0 + chunk_rows] = lse - z_t
    return out


def top1_candidate(sum_nll, count):
    """Candidate with the lowest mean (over its segments) per-segment mean NLL."""
    seg_mean = sum_nll.double() / count.clamp(min=1).double()
    cand = torch.arange(seg_mean.numel(), device=seg_mean.device) % NUM_CANDIDATES
    score = torch.zeros(NUM_CANDIDATES, dtype=torch.float64, device=seg_mean.device).index_add_(0, cand, seg_mean)
    n = torch.bincount(cand, minlength=NUM_CANDIDATES).clamp(min=1)
    return int(torch.argmin(score / n))


# ---- providers: each returns (sum_nll [S], count [S], row_nll over the scored rows [R]) or None ----------------------
def segment_reduce(loss, b, full):
    """index_add_ per segment of a per-row loss (zeros on ignored rows), as a user of a plain CE would: over all T rows
    (full) or over the R gathered rows. -> (sum_nll, count, loss over the scored rows)"""
    loss = loss.float()
    seg, tgt = (b["segment_ids_full"], b["targets_full"]) if full else (b["segment_ids"], b["targets"])
    sum_nll = torch.zeros(b["num_segments"], dtype=torch.float32, device=loss.device).index_add_(0, seg, loss)
    count = torch.zeros(b["num_segments"], dtype=torch.long, device=loss.device)
    count.index_add_(0, seg, (tgt != IGNORE).long())
    return sum_nll, count, (loss[b["row_index"]] if full else loss)


def run_naive(b):  # all T rows: the plain-CE user's cost
    logits = torch.mm(b["hidden"], b["weight"].T).float()
    loss = F.cross_entropy(logits, b["targets_full"], reduction="none", ignore_index=IGNORE)
    return segment_reduce(loss, b, full=True)


def run_torch_chunked(b):
    row_nll = torch.empty(b["R"], dtype=torch.float32, device=b["hidden"].device)
    out = segment_nll_torch(b["hidden"], b["weight"], b["targets"], b["segment_ids"], b["num_segments"],
                            row_index=b["row_index"], row_nll_out=row_nll)
    return out + (row_nll,)


def make_ours_triton(config=None):
    from kernels.segment_nll_triton import segment_nll_triton

    def run(b):
        row_nll = torch.empty(b["R"], dtype=torch.float32, device=b["hidden"].device)
        out = segment_nll_triton(b["hidden"], b["weight"], b["targets"], b["segment_ids"], b["num_segments"],
                                 row_index=b["row_index"], row_nll_out=row_nll, config=config)
        return out + (row_nll,)
    return run


def make_liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")

    def run(b):
        loss = loss_fn(b["weight"], b["hidden_rows"], b["targets"])
        if isinstance(loss, tuple):  # some versions return (loss, z_loss)
            loss = loss[0]
        return segment_reduce(loss, b, full=False)
    return run


def make_cce():
    from cut_cross_entropy import linear_cross_entropy

    def run(b):
        loss = linear_cross_entropy(b["hidden_rows"], b["weight"], b["targets"], ignore_index=IGNORE,
                                    reduction="none")
        return segment_reduce(loss, b, full=False)
    return run


def run_mm_ceiling(b):
    torch.mm(b["hidden_rows"], b["weight"].T)
    return None


def parse_config(text):
    """'BLOCK_N=256;num_stages=4' -> {'BLOCK_N': 256, 'num_stages': 4}; a name of
    kernels.segment_nll_triton.SM90_TWO_CTA_CONFIGS (e.g. 'one_warpgroup') -> that config."""
    from kernels.segment_nll_triton import SM90_TWO_CTA_CONFIGS

    if text.strip() in SM90_TWO_CTA_CONFIGS:
        return dict(SM90_TWO_CTA_CONFIGS[text.strip()])
    return {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(";") if kv.strip())}


def providers(device, ours_configs=()):
    """name -> (fn, rows it multiplies: 'R' or 'T'). Optional packages that fail to import are providers that fail
    (recorded as such), not silently missing ones."""
    out = {"naive": (run_naive, "T"), "torch_chunked": (run_torch_chunked, "R")}
    if device.type == "cuda":
        for name, make in (("liger_flce", make_liger), ("cce", make_cce)):
            try:
                out[name] = (make(), "R")
            except Exception as e:  # noqa: BLE001 -- unavailable: every call of it reports why
                def unavailable(b, e=e):
                    raise RuntimeError(f"unavailable: {type(e).__name__}: {e}")
                out[name] = (unavailable, "R")
        out["ours_triton"] = (make_ours_triton(), "R")
        for text in ours_configs:
            out[f"ours_triton[{text}]"] = (make_ours_triton(parse_config(text)), "R")
    else:
        print("[skip] liger_flce, cce, ours_triton: CUDA only (the Triton interpreter is far too slow to time)")
    out["mm_ceiling"] = (run_mm_ceiling, "R")
    return out


# ---- timing ---------------------------------------------------------------------------------------------------------
def time_ms(fn, device):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    # no separate warm-up: every provider has just run once for the error columns
    times = []
    for _ in range(CPU_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def peak_extra_mib(fn, device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def fmt(value, width, spec):
    return format("-" if value is None else format(value, spec), f">{width}")


# ---- main -----------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on CPU (default when CUDA is unavailable)")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/kernel_<device>.csv)")
    ap.add_argument("--heads", default=None, help="comma-separated head names (default: all for the device)")
    ap.add_argument("--rows", default=None, help="comma-separated scored-row counts R")
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="response fractions")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default bf16 GPU, fp32 CPU")
    ap.add_argument("--ours-configs", default="", help="extra ours_triton configs, '|'-separated, each "
                    "'k=v;k=v' or a name of SM90_TWO_CTA_CONFIGS (e.g. 'BLOCK_N=256;num_stages=4|one_warpgroup')")
    ap.add_argument("--providers", default=None, help="comma-separated subset of providers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_grad_enabled(False)  # forward-only scoring for every provider

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    on_gpu = device.type == "cuda"
    heads = GPU_HEADS if on_gpu else CPU_HEADS
    if args.heads:
        all_heads = {**GPU_HEADS, **CPU_HEADS}
        heads = {name: all_heads[name] for name in args.heads.split(",")}
    rows = [int(x) for x in args.rows.split(",")] if args.rows else (GPU_ROWS if on_gpu else CPU_ROWS)
    fractions = [float(x) for x in args.fractions.split(",")]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if on_gpu else "fp32")]
    device_name = describe_device(device)
    tag = "cpu" if not on_gpu else device_name.lower().replace("nvidia ", "").split()[0].replace("/", "-")
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernel_{tag}.csv")

    meta = dict(device=device_name, torch=torch.__version__, triton=triton_version(), commit=git_commit(),
                dtype=str(dtype).replace("torch.", ""))
    print(" | ".join(f"{k}: {v}" for k, v in meta.items()))
    provs = providers(device, [c for c in args.ours_configs.split("|") if c.strip()])
    if args.providers:
        wanted = args.providers.split(",")
        provs = {k: v for k, v in provs.items() if k in wanted or k.split("[")[0] in wanted}

    header = ["head", "H", "V", "R", "fraction", "T", "provider", "rows_computed", "ms", "tflops_useful",
              "tflops_performed", "peak_extra_mib", "ref_rows", "max_abs_err", "top1_agree", "status"]
    print(f"{'head':<13}{'R':>7}{'frac':>6}{'provider':>15}{'ms':>10}{'TF/s use':>10}{'TF/s perf':>10}"
          f"{'MiB':>9}{'max err':>10}{'top1':>6}  status")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + header)
        w.writeheader()
        for head, (H, V) in heads.items():
            for R in rows:
                for fraction in fractions:
                    b = make_batch(R, fraction, H, V, dtype, device, seed=args.seed)
                    ref_rows = min(R, REF_SAMPLE_ROWS)
                    ref_nll = reference_row_nll(b, ref_rows)
                    ref_top1 = None
                    if ref_rows == R:
                        ref_sum = torch.zeros(b["num_segments"], dtype=torch.float64, device=device)
                        ref_sum.index_add_(0, b["segment_ids"], ref_nll)
                        ref_top1 = top1_candidate(ref_sum, torch.bincount(b["segment_ids"],
                                                                          minlength=b["num_segments"]))
                    for name, (fn, which_rows) in provs.items():
                        rec = measure(name, fn, which_rows, b, ref_nll, ref_top1, on_gpu, device)
                        rec.update(head=head, fraction=fraction)
                        w.writerow({**meta, **{k: rec.get(k) for k in header}})
                        f.flush()  # a crash later keeps what was measured
                        print(f"{head:<13}{R:>7}{fraction:>6}{name:>15}{fmt(rec['ms'], 10, '.2f')}"
                              f"{fmt(rec['tflops_useful'], 10, '.3f')}{fmt(rec['tflops_performed'], 10, '.3f')}"
                              f"{fmt(rec['peak_extra_mib'], 9, '.0f')}{fmt(rec['max_abs_err'], 10, '.2e')}"
                              f"{fmt(rec['top1_agree'], 6, 'd')}  {rec['status']}", flush=True)
                    del b, ref_nll
                    if on_gpu:
                        torch.cuda.empty_cache()
    print(f"wrote {out_path}" + ("" if on_gpu else "  (CPU figures: PyTorch providers only, peak memory not measured)"))


def measure(name, fn, which_rows, b, ref_nll, ref_top1, on_gpu, device):
    """One provider on one batch -> a CSV record; any exception becomes the record's status."""
    R, H, V = b["R"], b["H"], b["V"]
    n_rows = R if which_rows == "R" else b["T"]
    rec = dict(H=H, V=V, R=R, T=b["T"], provider=name, rows_computed=n_rows, ms=None, tflops_useful=None,
               tflops_performed=None, peak_extra_mib=None, ref_rows=ref_nll.numel(), max_abs_err=None,
               top1_agree=None, status="ok")
    if not on_gpu and 2 * n_rows * H * V / 1e9 > CPU_MAX_GFLOP:
        rec["status"] = f"skipped: > {CPU_MAX_GFLOP} GFLOP on CPU"
        return rec
    try:
        result = fn(b)
        if result is not None:
            sum_nll, count, row_nll = result
            rec["max_abs_err"] = (row_nll[:ref_nll.numel()].double() - ref_nll).abs().max().item()
            if ref_top1 is not None:
                rec["top1_agree"] = int(top1_candidate(sum_nll, count) == ref_top1)
        del result
        rec["peak_extra_mib"] = peak_extra_mib(lambda: fn(b), device)
        rec["ms"] = time_ms(lambda: fn(b), device)
        rec["tflops_useful"] = 2 * R * H * V / (rec["ms"] * 1e-3) / 1e12
        rec["tflops_performed"] = 2 * n_rows * H * V / (rec["ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 -- record the failure, go on with the sweep
        rec["status"] = "OOM" if isinstance(e, torch.OutOfMemoryError) else \
            f"error: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    return rec

if __name__ == "__main__":
    main()
