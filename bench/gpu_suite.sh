#!/usr/bin/env bash
# The GPU suite: one command on a lent CUDA machine (no network, the image's own torch/triton/transformers) that
# brings every figure back in $OUT, plus `prepare`, run beforehand on a machine with the package index.
#
#     bash bench/gpu_suite.sh prepare          # here: wheels the image lacks -> .whl/ (git-ignored), prints the command
#     bash bench/gpu_suite.sh                  # there: the default parts (one 600 s command, <= 8 min of timeouts)
#     bash bench/gpu_suite.sh 8b               # there: the Qwen3-8B-shape parts (a second 600 s command)
#     bash bench/gpu_suite.sh kernel tune      # named parts only
#     SAPO_SUITE_DRYRUN=1 OUT=/tmp/dry bash bench/gpu_suite.sh      # here: every default part, tiny sizes, on CPU
#     SAPO_SUITE_DRYRUN=1 OUT=/tmp/dry bash bench/gpu_suite.sh 8b   # here: the 8B parts' commands at tiny sizes
#
# Every part is its own process under its own `timeout` (the table below): a part that fails or runs out of time is
# recorded and the next one runs. What comes back ($OUT, else bench/results/suite_<device>_<time>/), at most 8 files,
# none in a folder: gpu_suite.log (everything printed), summary.md + summary.json (one table: part, status, seconds,
# headline; the versions and the device), up to 4 CSVs (<part>.csv, the first 4 parts that wrote one), runs.tar.gz
# (every part's folder without adapters, checkpoints or weights). The summary is printed last.
#
# Adding a part: one line in PARTS (name, timeout in seconds, group) and one function part_<name> that writes into
# $PART_DIR (its CSV, if any, as $PART_DIR/<name>.csv) and prints a line starting with "HEADLINE:" (the summary's
# figure; else the part's last line is used). $DRYRUN is 1 in the CPU dry run: use tiny sizes then.
set -u
cd "$(dirname "$0")/.."

#     name        timeout_s group    what (estimates on an H100; the default group's timeouts sum to <= 480 s)
PARTS="
gpu_tests     130 default  CUDA tests: compiled kernels vs float64, FlexAttention and Liger vs the plain path
kernel         50 default  fused head kernel vs torch chunked / liger / cut-cross-entropy / torch.mm (3 heads)
tune           50 default  sm_90 kernel config vs the two-CTA candidates
scoring       120 default  selection vs training at the paper's proportions (Qwen3-0.6B shape)
train_sapo    120 default  a short train_sapo.py run on CUDA (Qwen3-0.6B shape): selection, training, evaluation
training      280 8b       bench_training.py at the Qwen3-8B shape: checkpointing x budgets, flex, liger
paper_run     250 8b       a whole NI-Seq-C1 run at the Qwen3-8B shape, timed in pieces and extrapolated
generation    300 gen      bench_generation.py at the Qwen3-8B shape: one NI-Seq-C1 row, then the paths at k = 0, 1, 5
"

find_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local common; common=$(git rev-parse --git-common-dir 2>/dev/null || echo .git)
    for c in python3 .venv/bin/python "$common/../.venv/bin/python" .ci-venv/bin/python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" 2>/dev/null; then echo "$c"; return; fi
    done
    echo python3
}
PY=$(find_python)

# ---- prepare (on a machine with the package index) ----------------------------------------------------------------
if [ "${1:-}" = prepare ]; then
    set -e
    rm -rf .whl && mkdir -p .whl
    src=$(mktemp -d)
    grep -v '^\s*#' requirements-gpu-suite.txt | grep -v '^\s*$' | while read -r req; do
        # The lent machine runs Python 3.12 on x86-64; pure-Python wheels where the index has them, else the source
        # distribution built into a wheel here (rouge-score 0.1.2 has none).
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
                -d .whl "$req" 2>/dev/null; then
            "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$src" "$req"
            "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$src"/*
            rm -rf "${src:?}"/*
        fi
    done
    rm -rf "$src"
    if ls .whl | grep -Eiq '^(torch|triton|transformers)-'; then
        echo "gpu_suite prepare: .whl/ must not hold torch, triton or transformers (the image's are used)" >&2; exit 1
    fi
    echo "built .whl/ ($(du -sh .whl | cut -f1)):"; ls .whl | sed 's/^/  /'
    echo
    echo "On the GPU machine (the device tool's run), two commands of 600 s, each carrying .whl:"
    echo "  run(command=\"bash bench/gpu_suite.sh\", carry=[\".whl\"], timeout_s=590)      # default parts, <= 8 min"
    echo "  run(command=\"bash bench/gpu_suite.sh 8b\", carry=[\".whl\"], timeout_s=590)   # Qwen3-8B-shape parts"
    echo "The figures come back in \$OUT: summary.md, summary.json, <part>.csv, runs.tar.gz, gpu_suite.log."
    exit 0
fi

# ---- which parts --------------------------------------------------------------------------------------------------
DRYRUN=${SAPO_SUITE_DRYRUN:-}
part_timeout() { echo "$PARTS" | awk -v n="$1" '$1 == n {print $2}'; }
group_parts() { echo "$PARTS" | awk -v g="$1" '$3 == g {printf "%s ", $1}'; }
selected=""
for arg in "${@:-default}"; do
    if [ -n "$(group_parts "$arg")" ]; then selected="$selected $(group_parts "$arg")"
    elif [ -n "$(part_timeout "$arg")" ]; then selected="$selected $arg"
    else echo "gpu_suite: no part or group named '$arg' (parts: $(echo "$PARTS" | awk 'NF {printf "%s ", $1}'))" >&2
        exit 2
    fi
done

if [ -z "$DRYRUN" ]; then
    DEV=$($PY -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').split()[0])") || {
        echo "gpu_suite: no CUDA device visible to torch (SAPO_SUITE_DRYRUN=1 runs the parts on CPU at tiny sizes)" >&2
        exit 1; }
else
    DEV=cpu-dryrun
fi
DEST=${OUT:-bench/results/suite_${DEV}_$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sapo_suite.XXXXXX")  # every part's files; what comes back is chosen at the end
LOG="$DEST/gpu_suite.log"
export PY DEV DRYRUN WORK PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "gpu_suite on $DEV, parts:$selected, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)" \
    | tee "$LOG"

# Wheels the image lacks, into a scratch directory in front of the image's packages; never over its torch/triton.
if ls .whl/*.whl >/dev/null 2>&1; then
    SITE=${SAPO_SITE:-$WORK/site}
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl 2>&1 \
            | tee -a "$LOG"; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "installed $(ls .whl | tr '\n' ' ')into $SITE" | tee -a "$LOG"
    fi
else
    echo "no .whl/ (bash bench/gpu_suite.sh prepare builds it): rouge-score, nltk, liger-kernel and" \
         "cut-cross-entropy only if the image has them" | tee -a "$LOG"
fi

# ---- the parts ----------------------------------------------------------------------------------------------------
random_model() {  # a random-weight model directory of a real architecture ($1), written once per machine
    local dir="$WORK/models/$1"
    [ -f "$dir/config.json" ] || $PY bench/random_model.py --arch "$1" --dtype "$( [ -n "$DRYRUN" ] && echo fp32 || echo bf16)" \
        --out "$dir" >&2
    echo "$dir"
}

kernel_headline() {  # the largest head and row count of a bench_kernel.py CSV: each provider's ms (TF/s)
    $PY - "$1" <<'PYEOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r["status"] == "ok" and r["ms"]]
if rows:
    top = max(rows, key=lambda r: (int(r["V"]) * int(r["H"]), int(r["R"])))
    same = [r for r in rows if (r["head"], r["R"]) == (top["head"], top["R"])]
    print(f"HEADLINE: {top['head']} R={top['R']}: " + ", ".join(
        f"{r['provider']} {float(r['ms']):.2f} ms ({float(r['tflops_useful']):.0f} TF/s)" for r in same))
PYEOF
}

part_gpu_tests() {
    TRITON_INTERPRET=$([ -n "$DRYRUN" ] && echo 1 || echo 0) $PY -m pytest -q -p no:cacheprovider \
        tests/test_kernel_cuda.py tests/test_fused_ops.py tests/test_attention_flex.py
}

part_kernel() {
    if [ -n "$DRYRUN" ]; then
        $PY bench/bench_kernel.py --cpu --heads smollm2-135m --rows 64 --fractions 1.0 \
            --providers torch_chunked,mm_ceiling --out "$PART_DIR/kernel.csv"
    else
        $PY bench/bench_kernel.py --heads smollm2-135m,qwen3-0.6b,qwen3-8b --rows 2048,16384 --fractions 1.0 \
            --providers torch_chunked,liger_flce,cce,ours_triton,mm_ceiling --out "$PART_DIR/kernel.csv"
    fi
    kernel_headline "$PART_DIR/kernel.csv"
}

part_tune() {
    if [ -n "$DRYRUN" ]; then
        $PY bench/bench_kernel.py --cpu --heads smollm2-135m --rows 32 --fractions 1.0 --providers mm_ceiling \
            --out "$PART_DIR/tune.csv"
    else
        $PY bench/bench_kernel.py --heads qwen3-0.6b,qwen3-8b --rows 2048,16384 --fractions 1.0 \
            --providers ours_triton,mm_ceiling --ours-configs "two_warpgroups_128regs|one_warpgroup" \
            --out "$PART_DIR/tune.csv"
    fi
    kernel_headline "$PART_DIR/tune.csv"
}

part_scoring() {
    if [ -n "$DRYRUN" ]; then
        $PY bench/bench_selection.py --model "$(random_model tiny)" --score-instances 4 --train-instances 8 \
            --candidates 3 --epochs 1 --skip-agreement --out "$PART_DIR/selection"
    else
        $PY bench/bench_selection.py --model "$(random_model qwen3-0.6b)" --score-instances 250 \
            --train-instances 1000 --candidates 21 --skip-agreement --threads 8 --out "$PART_DIR/selection"
    fi
}

part_train_sapo() {
    local size
    if [ -n "$DRYRUN" ]; then
        size="--model $(random_model tiny) --dtype fp32 --max-candidates 3 --score-instances 4 --train-instances 8 --eval-instances 2 --max-new-tokens 2"
    else
        size="--model $(random_model qwen3-0.6b) --dtype bf16 --max-candidates 8 --score-instances 64 --train-instances 256 --eval-instances 32 --max-new-tokens 16"
    fi
    # shellcheck disable=SC2086
    $PY -m accelerate.commands.launch --num_processes 1 train_sapo.py $size --sequence sentiment,topic --epochs 1 \
        --gradient-checkpointing auto --micro-batch-tokens 16384 --output-dir "$PART_DIR/run" &&
    $PY -c "
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
t = [json.loads(p.read_text()) for p in sorted(run.glob('*/training.json'))]
print('HEADLINE: train_sapo: ' + '; '.join(f\"{r['seconds']:.1f} s training, checkpointing {r['gradient_checkpointing']}, \"
      f\"peak {r['peak_memory_bytes'] / 1e9:.1f} GB (est {r['estimated_peak_bytes'] / 1e9:.1f})\" for r in t))" "$PART_DIR/run"
}

part_training() {
    if [ -n "$DRYRUN" ]; then
        $PY bench/bench_training.py --arch tiny --profiles bench/results/training_gpu_profiles.json \
            --tasks task1355_sent_comp_summarization --in-process \
            --variants ours-ckpt@1024,ours@1024,ours@4096,ours-ckpt-flex@4096,ours-ckpt-liger@4096 \
            --out "$PART_DIR/training"
    else
        # The paper's shape: task224 (the longest task) at 1664 tokens. Budgets x checkpointing, then the options;
        # the variants likely to run out of memory (no checkpointing at 8k/16k: 80/143 GB estimated) after the rest.
        $PY bench/bench_training.py --qwen3-8b --profiles bench/results/training_gpu_profiles.json \
            --tasks task224_scruples_anecdotes_ethical_judgment --in-process --warmup --max-length 1664 \
            --micro-batch-tokens 16384 --variants \
            ours-ckpt@16384,ours-ckpt@8192,ours-ckpt@4096,ours@4096,ours-ckpt-flex@16384,ours-flex@4096,ours@8192,ours@16384,ours-ckpt-liger@16384,ours-liger@4096,ours-flex-liger@4096 \
            --out "$PART_DIR/training"
    fi
}

part_generation() {  # issue 23: folded adapter, token-budget batches and the static cache against today's path
    if [ -n "$DRYRUN" ]; then
        $PY bench/bench_generation.py --arch smollm2-135m --device cpu --dtype fp32 --instances 2 --k 0,1 \
            --lengths real --max-new-tokens 8 --step-batches "" --out "$PART_DIR/generation_dryrun"
    else
        $PY bench/bench_generation.py --arch qwen3-8b --dtype bf16 --instances 650 --k 5 --lengths real \
            --paths folded,budget,static --step-batches "" --out "$PART_DIR/generation_row" &&
        $PY bench/bench_generation.py --arch qwen3-8b --dtype bf16 --instances 64 --k 0,1,5 --lengths real,128 \
            --step-batches 1,16,64,256 --out "$PART_DIR/generation_compare"
    fi
}

part_paper_run() {
    if [ -n "$DRYRUN" ]; then
        $PY bench/bench_paper_run.py --arch tiny --device cpu --dtype fp32 --candidates 3 --score-instances 8 \
            --global-batch 8 --train-steps 2 --eval-batches 1 --eval-batch-size 4 --worst-case-tokens 8 \
            --out "$PART_DIR"
    else
        # Selection and training timed on task1310 (mean 191 tokens; task195 111 ... task224 520), the other tasks
        # extrapolated from it by tokens: task224's 21 x 250 alone would take about half the part's time.
        # --eval-batches 0: a whole row of R at reference-length answers (2,807 prompts, 177 batches of 16), 2 batches per task at
        # 128 new tokens.
        $PY bench/bench_paper_run.py --arch qwen3-8b --task task1310_amazonreview_rating_classification \
            --eval-batches 0 --worst-batches 2 --out "$PART_DIR"
    fi
}

printf "part\tstatus\tseconds\ttimeout\theadline\n" > "$WORK/status.tsv"
for part in $selected; do
    limit=$(part_timeout "$part")
    PART_DIR="$WORK/$part"
    mkdir -p "$PART_DIR"
    echo "== part $part (timeout ${limit} s) ==" | tee -a "$LOG"
    start=$(date +%s)
    : > "$PART_DIR/output.log"
    timeout --kill-after=10 "$limit" bash -c "$(declare -f random_model kernel_headline part_"$part"); PART_DIR='$PART_DIR' part_$part" \
        > "$PART_DIR/output.log" 2>&1 &
    pid=$!
    tail -n +1 -f --pid=$pid "$PART_DIR/output.log" | tee -a "$LOG"
    wait $pid
    rc=$?
    seconds=$(( $(date +%s) - start ))
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    headline=$(grep -a '^HEADLINE:' "$PART_DIR/output.log" | tail -1 | sed 's/^HEADLINE: *//')
    [ -n "$headline" ] || headline=$(grep -av '^\s*$' "$PART_DIR/output.log" | tail -1)
    printf "%s\t%s\t%s\t%s\t%s\n" "$part" "$status" "$seconds" "$limit" "$(echo "$headline" | tr '\t' ' ' | cut -c1-300)" \
        >> "$WORK/status.tsv"
    echo "== part $part: $status after $seconds s ==" | tee -a "$LOG"
done

$PY bench/suite_report.py --work "$WORK" --out "$DEST" --device "$DEV" ${DRYRUN:+--dry-run} 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
rm -rf "$WORK"
exit $status
