#!/usr/bin/env bash
# Every GPU check of the project in one call, for a CUDA machine without network (the H200 run),
# finished and summarised within END_S seconds (default 510) of its start:
#   0. the wheels of .whl/ (benchmarks/device_wheels.sh) installed into /tmp/site, on PYTHONPATH
#   1. the environment (GPU, driver, versions)                              -> $OUT/env.txt
#   2. the GPU-marked tests: pytest -m gpu (capped at 120 s)                -> $OUT/pytest_gpu.log
#   3. training throughput, full-size model, sdpa, 6 timed + 2 warm-up steps, one process per row
#      (per-row timeout), rows in priority order: full fine-tuning at the trainer's defaults
#      (mb 1); + bf16 weights with fp32 masters; + Liger; + both; + both and torch.compile; the
#      fastest of those at micro-batch 4; LoRA mb 1 (<= 16 GB); QLoRA mb 1 (<= 10 GB)
#                                                                        -> $OUT/throughput.{md,json}
#   4. packed vs padded, full-size model, sdpa: the short-answer mix at micro-batch 8 (target:
#      packed >= 1.5x tokens/s, same losses), then the DocVQA-like load  -> $OUT/packing.{md,json}
#   5. the summary, printed last                                         -> $OUT/summary.md
# Everything else (per-stage logs, per-row logs) goes into $OUT/logs.tar.gz, so that $OUT holds
# at most 8 files and no folder.
#
#   bash benchmarks/gpu_checks.sh              # OUT defaults to ./gpu_out
#   OUT=/some/dir PYTHON=/path/to/python bash benchmarks/gpu_checks.sh
#   DRY_RUN=1 bash benchmarks/gpu_checks.sh    # prints every command a GPU run makes, runs none
#   TINY=1 bash benchmarks/gpu_checks.sh       # rehearsal on a CPU machine: --tiny harnesses
#   END_S=400 bash benchmarks/gpu_checks.sh    # a shorter global budget
#   VARIANTS=full,lora,qlora bash benchmarks/gpu_checks.sh   # other throughput rows
#
# Budget (seconds from the start; the H200 estimates in brackets): wheels + environment [~20];
# pytest <= 120; throughput until END_S - 130 (each row ~20-30 s, compile ~2 min; no row starts
# with < 20 s left, a row is killed at its timeout: 75 s, 150 s under --compile, or at the stage's
# end); packing until END_S - 10 [~60-90 s], its rows written as they finish; the summary. Rows
# that did not run say why (skipped: needs CUDA / liger_kernel or bitsandbytes not installed /
# time, not available: a missing module, timeout, crash, error).
set -uo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
END_S="${END_S:-510}"
PACKING_RESERVE="${PACKING_RESERVE:-120}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RAW="$OUT/raw"  # per-stage logs: packed into logs.tar.gz at the end
mkdir -p "$RAW"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY_RUN="${DRY_RUN:-0}"
TINY="${TINY:-0}"
# The throughput rows in priority order (train_throughput.py --variants; VARIANTS=... overrides).
DEFAULT_VARIANTS="full,full+bf16-weights,full+liger,full+bf16-weights+liger"
DEFAULT_VARIANTS+=",full+bf16-weights+liger+compile,best@4,lora,qlora"
VARIANTS="${VARIANTS:-$DEFAULT_VARIANTS}"
BENCH_ARGS=(--isolate --attn sdpa --steps 6 --warmup 2 --timeout 75)
PACKING_ARGS=(--model full --device cuda --attn sdpa --steps 6 --loads short-mix,docvqa)
NEED_GPU="torch.cuda.is_available()"
MODEL_NOTE="full-size model, sdpa"
if [ "$TINY" = 1 ]; then
    # In-process rows: a CPU rehearsal of the plan, not of the isolation (tested on its own).
    BENCH_ARGS=(--no-isolate --tiny --attn sdpa --steps 1 --warmup 0)
    PACKING_ARGS=(--model tiny --device cpu --attn sdpa --steps 2 --loads short-mix)
    NEED_GPU="True"
    MODEL_NOTE="TINY: tiny preset on CPU, sdpa"
fi
[ "$DRY_RUN" = 1 ] && NEED_GPU="True"

# step LOG LIMIT CMD...: run CMD with a time limit (s), output to LOG; DRY_RUN=1 only prints it.
step() {
    local log="$1" limit="$2"
    shift 2
    echo "+ [${SECONDS}s] timeout $limit $* >$log 2>&1"
    [ "$DRY_RUN" = 1 ] && return 0
    timeout -k 10 "$limit" "$@" >"$log" 2>&1
}

# An exit code in words (124/137: killed at the stage's time limit).
describe_rc() {
    case "$1" in
        0) echo "exit code 0" ;;
        124 | 137) echo "exit code $1: stopped at the stage's time limit" ;;
        *) echo "exit code $1" ;;
    esac
}

# Seconds left before END_S, less a reserve.
left() { echo $((END_S - SECONDS - ${1:-0})); }

# The first interpreter whose torch sees a GPU: $PYTHON, the project's .venv, then the system one.
pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
        if "$candidate" -c "import torch, sys; sys.exit(not $NEED_GPU)" >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# $OUT at the end: the compact set, everything else in logs.tar.gz (runs once, also when killed).
FINALIZED=0
finalize() {
    [ "$FINALIZED" = 1 ] && return
    FINALIZED=1
    [ -d "$RAW" ] || return
    tar -czf "$OUT/logs.tar.gz" -C "$RAW" . 2>/dev/null
    rm -rf "$RAW"
}
trap finalize EXIT
trap 'exit 143' TERM INT

PY="$(pick_python)" || {
    echo "no Python with a CUDA-enabled torch found (tried \$PYTHON, .venv/bin/python, python3)" \
        | tee "$OUT/summary.md"
    exit 1
}

# 0. wheels: what the machine lacks (transformers 5.24, peft, pydantic, liger-kernel, ...).
wheels_note="no .whl/ folder: the machine's own packages"
if compgen -G ".whl/*.whl" >/dev/null; then
    if [ "$TINY" = 1 ]; then
        wheels_note="TINY: .whl/ not installed (cp312 wheels for the device)"
        echo "+ $wheels_note"
    else
        step "$RAW/wheels.log" 120 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        wheels_rc=$?
        export PYTHONPATH="/tmp/site:$PYTHONPATH"
        wheels_note="$(find .whl -name '*.whl' | wc -l) wheels installed into /tmp/site (exit code $wheels_rc)"
        [ "$DRY_RUN" = 1 ] || echo "$wheels_note"
    fi
fi

# 1. environment.
[ "$DRY_RUN" = 1 ] || {
    echo "# date: $(date -u '+%Y-%m-%d %H:%M UTC')   python: $PY   git: $(git rev-parse --short HEAD 2>/dev/null)"
    echo "# wheels: $wheels_note"
    nvidia-smi 2>&1 || true
    "$PY" - <<'EOF'
import importlib
import importlib.metadata as metadata
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", gpu)
for name, dist in (("transformers", "transformers"), ("peft", "peft"), ("pydantic", "pydantic"),
                   ("accelerate", "accelerate"), ("triton", "triton"),
                   ("liger_kernel", "liger-kernel"), ("bitsandbytes", "bitsandbytes"),
                   ("flash_attn", "flash-attn"), ("deepspeed", "deepspeed")):
    try:
        module = importlib.import_module(name)
        print(name, metadata.version(dist), "from", module.__file__.rsplit("/", 2)[0])
    except Exception as exc:
        print(name, "unavailable:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
EOF
} >"$OUT/env.txt" 2>&1
echo "+ [${SECONDS}s] environment report >$OUT/env.txt 2>&1 (python: $PY)"
[ "$DRY_RUN" = 1 ] || grep -E "^(torch|transformers|peft|liger_kernel|bitsandbytes) " "$OUT/env.txt"

# 2. GPU-marked tests, only the modules that hold some (collecting the rest would need every
# CPU-only dependency, PyAV, jsonschema, ..., on the GPU machine too).
PYTEST_ARGS=(-m gpu -q -rs -p no:cacheprovider)
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST_ARGS+=(--timeout 100)
fi
mapfile -t GPU_TEST_FILES < <(grep -l "mark.gpu" tests/test_*.py)
step "$OUT/pytest_gpu.log" 120 "$PY" -m pytest "${PYTEST_ARGS[@]}" "${GPU_TEST_FILES[@]}"
pytest_rc=$?
[ "$pytest_rc" -eq 5 ] && pytest_rc=0  # 5: no test is marked gpu, nothing failed

# 3. throughput rows, in priority order, until END_S - PACKING_RESERVE.
bench_limit=$(left $((PACKING_RESERVE + 10)))
bench_rc=0
if [ "$bench_limit" -ge 30 ] || [ "$DRY_RUN" = 1 ]; then
    step "$RAW/throughput.log" $((bench_limit + 20)) "$PY" benchmarks/train_throughput.py \
        "${BENCH_ARGS[@]}" --variants "$VARIANTS" --time-limit "$bench_limit" \
        --out "$RAW/throughput.md"
    bench_rc=$?
else
    echo "throughput skipped: only $bench_limit s left" | tee "$RAW/throughput.log"
    bench_rc=124
fi
for ext in md json; do
    [ -f "$RAW/throughput.$ext" ] && cp "$RAW/throughput.$ext" "$OUT/throughput.$ext"
done

# 4. packed vs padded (short-mix first: the issue's target), rows written as they finish.
pack_limit=$(left 10)
packing_rc=0
if [ "$pack_limit" -ge 30 ] || [ "$DRY_RUN" = 1 ]; then
    step "$RAW/packing.log" "$pack_limit" "$PY" benchmarks/packing.py "${PACKING_ARGS[@]}" \
        --out "$RAW/packing.md"
    packing_rc=$?
else
    echo "packing skipped: only $pack_limit s left" | tee "$RAW/packing.log"
    packing_rc=124
fi
for ext in md json; do
    [ -f "$RAW/packing.$ext" ] && cp "$RAW/packing.$ext" "$OUT/packing.$ext"
done
[ "$DRY_RUN" = 1 ] && exit 0

# 5. summary, printed last (the call returns only the end of the output).
pytest_line="$(grep -E "(passed|failed|skipped|error|no tests ran)" "$OUT/pytest_gpu.log" | tail -n 1)"
{
    echo "# GPU checks $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS} s"
    echo
    echo "- environment (env.txt): $(grep -m1 "^torch" "$OUT/env.txt"); $wheels_note"
    echo "- versions: $(grep -E "^(transformers|peft|liger_kernel|bitsandbytes|triton) " \
        "$OUT/env.txt" | cut -d' ' -f1-2 | sed 's/:$//' | paste -sd ',' | sed 's/,/, /g')"
    echo "- pytest -m gpu: exit code $pytest_rc (${pytest_line:-no summary line})"
    grep -E "^(FAILED|ERROR) " "$OUT/pytest_gpu.log" | head -n 10 | sed 's/^/  - /'
    echo "- throughput: $(describe_rc "$bench_rc") (stage and per-row logs in logs.tar.gz)"
    echo "- packed vs padded: $(describe_rc "$packing_rc") (finished rows are kept)"
    echo
    echo "## Training throughput ($MODEL_NOTE)"
    echo
    if [ -f "$OUT/throughput.md" ]; then
        sed -n '/^| mode/,$p' "$OUT/throughput.md"
    else
        echo "(no table: see throughput.log in logs.tar.gz)"
        tail -n 5 "$RAW/throughput.log" 2>/dev/null
    fi
    echo
    echo "## Packed vs padded"
    echo
    cat "$OUT/packing.md" 2>/dev/null || {
        echo "(no table: see packing.log in logs.tar.gz)"
        tail -n 5 "$RAW/packing.log" 2>/dev/null
    }
} >"$OUT/summary.md"
finalize
cat "$OUT/summary.md"
[ "$pytest_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$packing_rc" -eq 0 ]
