#!/usr/bin/env bash
# The ONE prepared script for a lent GPU (H100/H200, no internet): CUDA tests + every GPU
# benchmark in < 8 minutes, everything written under $OUT.
#
#   bash benchmarks/gpu_suite.sh              # from the repo root, on the device machine
#
# Only 8 files come back from $OUT, so it leaves three: summary.txt (one line per step: status,
# seconds), suite.log (all step output, in order) and gpu_suite.tar.gz (every step's log and
# JSON). Steps run in order, each under its own timeout, cut further to fit BUDGET_S in total;
# a failing step is recorded and the suite goes on.
#
# Baselines that are not in the device image (Liger-Kernel, Cut-Cross-Entropy) are installed from
# wheels in benchmarks/wheels/ when present. Fetch them on a machine with PyPI and carry the
# folder with the call (run(..., carry=["benchmarks/wheels"]) if it is git-ignored):
#   pip download liger-kernel==0.8.5 cut-cross-entropy==25.1.1 --no-deps -d benchmarks/wheels
#
# To add a step: one `step NAME TIMEOUT_S COMMAND...` line in the STEPS section. Write JSON to
# "$WORK/<name>.json" and anything else under "$WORK"; it all lands in gpu_suite.tar.gz.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WORK=$(mktemp -d /tmp/gpu_suite.XXXX)
BUDGET_S=${BUDGET_S:-470}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
: >"$WORK/summary.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -le 5 ]; then
        echo "SKIP    ${name} (suite budget spent)" | tee -a "$WORK/summary.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== ${name} (limit ${limit}s): $*" | tee -a "$WORK/suite.log"
    local t0=$(date +%s) rc
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$WORK/${name}.log" 2>&1
    rc=$?
    cat "$WORK/${name}.log" >>"$WORK/suite.log"
    local status=OK
    [ $rc -ne 0 ] && status="FAIL($rc)"
    [ $rc -eq 124 ] || [ $rc -eq 130 ] && status="TIMEOUT"
    printf '%-8s %-28s %4ss\n' "$status" "$name" "$(($(date +%s) - t0))" | tee -a "$WORK/summary.txt"
}

finish() {
    cp "$WORK/summary.txt" "$WORK/suite.log" "$OUT/" 2>/dev/null
    tar -czf "$OUT/gpu_suite.tar.gz" -C "$WORK" . 2>/dev/null
    echo; echo "--- summary ($(($(date +%s) - START))s of ${BUDGET_S}s)"; cat "$WORK/summary.txt"
}
trap finish EXIT

# ------------------------------------------------------------------------------------- STEPS
step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; '"$PY"' -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; git log -1 --format="%h %cI %s" 2>/dev/null || true'
step install 150 bash -c '
    if ls benchmarks/wheels/*.whl >/dev/null 2>&1; then '"$PY"' -m pip install -q --no-deps --no-index benchmarks/wheels/*.whl; fi
    # The C++ extension (retrieval) needs a build; the Triton kernels do not (PYTHONPATH suffices).
    '"$PY"' -m pip install -q -e . --no-deps --no-build-isolation || echo "editable install failed: using PYTHONPATH"'

# Correctness on the real backend: every test marked cuda (all files).
step test_cuda 150 "$PY" -m pytest -q -m cuda tests/ -p no:cacheprovider --durations=10

# token_logprobs (issue 2). The target row first (bf16, N=8192, D=4096, V=128256, vs Liger/CCE),
# then the sweep over the teacher shapes, cut short by --budget-s if the card is slow.
step bench_logprob_target 90 "$PY" benchmarks/bench_logprob.py --device cuda --shapes llama-3-8b --n 8192 --autotune --json "$WORK/bench_logprob_target.json"
step bench_logprob 150 "$PY" benchmarks/bench_logprob.py --device cuda --n 1024 4096 8192 32768 --budget-s 130 --json "$WORK/bench_logprob.json"
# utility_infonce (issue 3): its whole test file on the real backend (Triton vs float64 reference,
# two-process gloo gather), then naive vs chunked vs Triton (vs Inf-CL when installed).
step test_infonce 90 "$PY" -m pytest -q tests/test_infonce.py tests/test_infonce_distributed.py -p no:cacheprovider
step bench_infonce 120 "$PY" benchmarks/bench_infonce.py --quick --device cuda --json "$WORK/bench_infonce.json"
# teacher scoring (issue 4): passages/s vs the naive HF loop on the GPU.
step bench_scoring 90 "$PY" benchmarks/bench_scoring.py --quick --json "$WORK/bench_scoring.json"
# ----------------------------------------------------------------------------- END OF STEPS
