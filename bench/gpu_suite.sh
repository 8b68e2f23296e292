#!/usr/bin/env bash
# One command for a lent CUDA machine with no hub access. Every part is a separate process under `timeout`, so a
# part that fails or runs long is recorded and the next one still runs; results go to $SAPO_RESULTS (default
# bench/results/), named after the device.
#
#     bash bench/gpu_suite.sh                  # every part
#     bash bench/gpu_suite.sh kernel_tests kernel   # only the fused kernel's GPU tests and benchmark
#     SAPO_RESULTS=/tmp/out PART_TIMEOUT=500 bash bench/gpu_suite.sh kernel
#
# Parts:
#   kernel_tests  tests/test_kernel_cuda.py: the compiled kernels against float64 on this GPU (interpreter off)
#   kernel    bench/bench_kernel.py in bf16 on the LM heads of SmolLM2-135M (576 x 49152), Qwen3-0.6B (1024 x 151936)
#             and Qwen3-8B (4096 x 151936), random weights, 2k and 16k scored rows: ours (Triton) against the torch
#             chunked path, liger-kernel's fused linear CE, cut-cross-entropy and a bare torch.mm of the same rows.
#   tune      the sm_90 default config against the two-CTA-per-SM candidates (SM90_TWO_CTA_CONFIGS), side by side
#             in one process, with the bare torch.mm as the ceiling: Qwen3-8B and Qwen3-0.6B heads, 2k and 16k rows
#   scoring   bench/bench_selection.py part 1 in bf16 on CUDA: selection (naive, exhaustive, racing) against training
#             at the paper's proportions (21 candidates x 250 scored, 10 epochs x 1000 trained; one epoch timed)
#   training  a short `accelerate launch train_sapo.py` on CUDA (bf16, the Triton scoring path, the packed training
#             step with checkpointing): two built-in tasks, selection, training, evaluation
#   generation  bench/bench_generation.py in bf16 on a random-weight Qwen3-8B: an NI-Seq-C1-sized row (650 prompts x 5
#             tasks' worth of built-in or --data-dir prompts, k = 5 adapters, real answer lengths) through the folded,
#             token-budget and static-cache paths, then today's path against them at k = 0, 1, 5 on 64 prompts per
#             task with real lengths and the 128-token worst case; results/generation_<dev>_*.{json,md}
# scoring and training use $SAPO_MODEL_DIR when it names a local model directory; otherwise a random-weight model of
# the architecture $SAPO_ARCH (smollm2-135m, qwen3-0.6b or qwen3-8b; default qwen3-0.6b) is written from its config by
# bench/random_model.py (timings and memory are the real architecture's; its scores mean nothing).
#
# Optional providers: liger-kernel and cut-cross-entropy are pure-Python wheels (torch + triton are their only
# requirements). If they are not importable and wheels sit in .whl/ (pip download --no-deps ... -d .whl NAME), they are
# installed into a scratch --target directory, never over this machine's torch/triton; if that fails the benchmark
# records them as unavailable and goes on.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${SAPO_RESULTS:-bench/results}
PART_TIMEOUT=${PART_TIMEOUT:-590}  # seconds per part (< 10 minutes)
mkdir -p "$RESULTS"
DEV=$($PY -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').split()[0])") || {
    echo "gpu_suite: no CUDA device visible to torch" >&2; exit 1; }
LOG="$RESULTS/gpu_suite_${DEV}.log"
echo "gpu_suite on $($PY -c 'import torch; print(torch.cuda.get_device_name(0))') $(date -u +%FT%TZ)" | tee -a "$LOG"

if ! $PY -c "import liger_kernel, cut_cross_entropy" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${SAPO_SITE:-/tmp/sapo_site}
    if $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_suite: installing .whl/*.whl failed; liger_flce / cce will be recorded as unavailable" | tee -a "$LOG"
    fi
fi

part_kernel_tests() {
    TRITON_INTERPRET=0 $PY -m pytest -q -p no:cacheprovider tests/test_kernel_cuda.py
}

part_kernel() {
    $PY bench/bench_kernel.py --heads smollm2-135m,qwen3-0.6b,qwen3-8b --rows 2048,16384 --fractions 1.0 \
        --providers torch_chunked,liger_flce,cce,ours_triton,mm_ceiling --out "$RESULTS/kernel_${DEV}.csv" \
        ${KERNEL_ARGS:-}
}

part_tune() {
    $PY bench/bench_kernel.py --heads qwen3-0.6b,qwen3-8b --rows 2048,16384 --fractions 1.0 \
        --providers ours_triton,mm_ceiling --ours-configs "two_warpgroups_128regs|one_warpgroup" \
        --out "$RESULTS/kernel_tune_${DEV}.csv"
}

# ---- scoring and training on CUDA, on a local model or a random-weight model of a real architecture -------------
model_dir() {
    if [ -n "${SAPO_MODEL_DIR:-}" ]; then echo "$SAPO_MODEL_DIR"; return; fi
    local dir="/tmp/sapo_random_${SAPO_ARCH:-qwen3-0.6b}"
    [ -f "$dir/config.json" ] || $PY bench/random_model.py --arch "${SAPO_ARCH:-qwen3-0.6b}" --dtype bf16 --out "$dir" >&2
    echo "$dir"
}

part_scoring() {
    $PY bench/bench_selection.py --model "$(model_dir)" --score-instances 250 --train-instances 1000 --candidates 21 \
        --skip-agreement --threads 8 --out "$RESULTS/selection_${DEV}_${SAPO_ARCH:-qwen3-0.6b}"
}

part_training() {
    accelerate launch --num_processes 1 train_sapo.py --model "$(model_dir)" --dtype bf16 \
        --sequence sentiment,topic --max-candidates 8 --score-instances 64 --train-instances 256 --epochs 1 \
        --gradient-checkpointing --micro-batch-tokens 16384 --eval-instances 32 --max-new-tokens 16 \
        --output-dir "$RESULTS/train_${DEV}_${SAPO_ARCH:-qwen3-0.6b}"
}

part_generation() {  # ours (issue 23); self-contained: its own model, in the benchmark's process
    $PY bench/bench_generation.py --arch qwen3-8b --dtype bf16 --instances 650 --k 5 --lengths real \
        --paths folded,budget,static --step-batches "" --out "$RESULTS/generation_${DEV}_row" &&
    $PY bench/bench_generation.py --arch qwen3-8b --dtype bf16 --instances 64 --k 0,1,5 --lengths real,128 \
        --step-batches 1,16,64,256 --out "$RESULTS/generation_${DEV}_compare"
}

status=0
for part in ${@:-kernel_tests kernel tune scoring training generation}; do
    echo "== part $part ==" | tee -a "$LOG"
    start=$(date +%s)
    timeout "$PART_TIMEOUT" bash -c "$(declare -f model_dir part_$part); PY=$PY RESULTS=$RESULTS DEV=$DEV part_$part" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "== part $part: exit $rc after $(( $(date +%s) - start )) s ==" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
done
exit $status
