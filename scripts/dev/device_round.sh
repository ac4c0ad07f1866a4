#!/usr/bin/env bash
# One measured round on the GPU machine, as a list of steps run in order inside one device call; each
# step gets what is left of the call's budget (BUDGET seconds, default 560), so the call ends in time and
# every finished step's output is in $OUT.
#
#   bash scripts/dev/device_round.sh scan_now scan_before              # over 100 s each on a fresh machine (compiles)
#   bash scripts/dev/device_round.sh model_now model_before            # about 2 min each
#   TESTS="tests/kernels" bash scripts/dev/device_round.sh gpu_tests   # the whole suite takes > 9 min: split it
#
# Steps: tests (whole suite on the GPU), scan_now / scan_before (benchmark_kernels.py), model_now (our loss),
# model_like (--loss-outside: both sides' cross-entropy on fp32 logits), falcon_share (what Falcon Mamba's norms
# cost the 130M training step), model_before (this script, the old
# package), large_7b / large_1.4b (benchmark_large.py, LARGE_FLAGS), prefill (130m and 1.4b at 1K, 8K, 64K),
# long_context (LONG_FLAGS), precision (PRECISION_FLAGS, default --runs fp32,bf16,fp16: 1,000 steps each), first_step (dev/first_step_timeline.py, TIMELINE_FLAGS: where the first training step's time goes), contention
# (dev/compile_contention.py: the pass's compiles alone and beside the background ones, on the host's CPU), decode_profile (wall vs GPU time per
# decoded token; MODEL_FLAGS gives another shape), prefill_profile (GPU time per kernel, PROFILE_FLAGS), host_time
# (benchmark_kernels.py --host-time: the scan's and the mixer's host vs GPU time per call; host_time@NAME: another tree's), choice_now / choice@NAME (decode_step_choice.py,
# CHOICE_FLAGS), few_rows (dev/few_rows_sweep.py for at most SWEEP_CAP seconds, then decode_step_choice.py with
# the sweep's best choices beside the shipped ones, FEW_ROWS_SHAPES), qlora_now / qlora@NAME (benchmark_large.py's QLoRA rows, QLORA_SHAPES), induction (the paper's
# induction heads to 2^20), induction_paper (closer to the paper's recipe: no curriculum, batch 8, 40,000 steps;
# tests to 2^INDUCTION_MAX_LOG2), multi_gpu (benchmark_multi_gpu.py, MULTI_FLAGS, default --bf16: needs a
# multi-GPU kind and the datasets wheels in .device_cache/datasets).
# A step with compiles in worker processes: HF_MAMBA_COMPILE_PROCESSES=1 OUT=... bash scripts/dev/device_round.sh
# model_now (the environment reaches every step; OUT keeps the two runs' files apart).
# Expects, carried in .device_cache/ (git ignores it): peers/ (a copy of ../shared/peers, mamba_ssm),
# bnb/*.whl for the QLoRA rows, and for *_before the old commit as a worktree in .device_cache/before
# (`git worktree add -f .device_cache/before COMMIT`). scan@NAME and model@NAME run those benchmarks from
# another tree copied to .device_cache/NAME (`git archive BRANCH | tar -x -C .device_cache/NAME`), so one call
# can time several commits side by side (prefill@NAME: the prefill rows, PREFILL_LENGTHS; prefill_profile@NAME:
# prefill_profile.py, PROFILE_FLAGS); tests@NAME runs
# TESTS (default tests/kernels) in that tree.
set -uo pipefail
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
# A cache directory per call: a warm machine keeps /tmp between calls, and a step's first-call rows must not
# find the kernels an earlier call of the same step compiled.
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache_$(date +%s)}
start=$SECONDS
budget=${BUDGET:-560}
left() { echo $((budget - (SECONDS - start))); }
here=$PWD
before=$here/.device_cache/before

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
for wheels in bnb datasets; do  # carried wheels the image lacks (bitsandbytes; datasets, dill, multiprocess)
    if [ -d .device_cache/$wheels ]; then
        python3 -m pip install -q --no-deps --target /tmp/site .device_cache/$wheels/*.whl >/dev/null 2>&1 \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
done
[ -f .device_cache/peers/activate.sh ] && source .device_cache/peers/activate.sh
install_tree() {  # install_tree NAME: .device_cache/NAME (a copy of another commit) into /tmp/tree_NAME, once
    [ -d "/tmp/tree_$1/hf_mamba" ] || python3 -m pip install -q --no-deps --no-build-isolation \
        --target "/tmp/tree_$1" "$here/.device_cache/$1" >/dev/null 2>&1
}

step() {  # step NAME CMD...: run CMD with the time left (or CAP seconds), its output to $OUT/NAME.txt
    local name=$1; shift
    local t; t=$(left)
    [ -n "${CAP:-}" ] && [ "$CAP" -lt "$t" ] && t=$CAP
    if [ "$t" -lt 20 ]; then echo "== $name: skipped, ${t}s left"; return; fi
    echo "== $name (${t}s left)"
    # each step its own Triton cache, so every first call below compiles (the first-step rows stay honest)
    TRITON_CACHE_DIR=$TRITON_CACHE_DIR/$name timeout -s INT -k 15 "$t" bash -c '"$@"' bash "$@" > "$OUT/$name.txt" 2>&1
    echo "   rc=$? after $((SECONDS - start))s"
    tail -n "${TAILN:-25}" "$OUT/$name.txt"
}
tree() {  # tree NAME SCRIPT ARGS...: run .device_cache/NAME/scripts/SCRIPT against that tree's package
    local name=$1 script=$2; shift 2
    (cd /tmp && PYTHONPATH=/tmp/tree_$name${PYTHONPATH:+:$PYTHONPATH} python3 "$here/.device_cache/$name/scripts/$script" "$@")
}
old() { (cd /tmp && PYTHONPATH=/tmp/tree_before${PYTHONPATH:+:$PYTHONPATH} python3 "$@"); }
now() { (cd /tmp && python3 "$@"); }
export -f old now tree
export here

for s in "$@"; do
    case $s in
    tests) TAILN=40 step tests python3 -m pytest -p no:cacheprovider -q -n 12 -rfE tests ;;
    gpu_tests) CAP=${TESTS_CAP:-200} TAILN=60 FAIL_LOG=$OUT/failures.txt PYTHONPATH=$here/scripts/dev${PYTHONPATH:+:$PYTHONPATH} \
        step gpu_tests python3 -m pytest -p no:cacheprovider -p pytest_fail_log -q -n 14 -rfE \
        --tb=short --timeout=240 -p no:benchmark \
        ${TESTS:-tests/kernels tests/test_model_triton.py tests/test_fused_mixer_padding.py \
        tests/test_half_precision.py tests/test_falcon_mamba.py tests/test_drop_in.py} ;;
    scan_now) CAP=${SCAN_CAP:-} step scan_now now "$here/scripts/benchmark_kernels.py" --no-torch-path --no-scaling --no-conv ;;
    tests@*) install_tree "${s#tests@}"; CAP=${TESTS_CAP:-200} TAILN=30 step "${s/@/_}" bash -c "cd $here/.device_cache/${s#tests@} \
        && PYTHONPATH=/tmp/tree_${s#tests@}\${PYTHONPATH:+:\$PYTHONPATH} python3 -m pytest -p no:cacheprovider -q -n 14 \
        -rfE --tb=short -p no:benchmark ${TESTS:-tests/kernels}" ;;
    scan@*) install_tree "${s#scan@}"; step "${s/@/_}" tree "${s#scan@}" benchmark_kernels.py --no-torch-path --no-scaling --no-conv ;;
    model@*) install_tree "${s#model@}"; step "${s/@/_}" tree "${s#model@}" benchmark_model.py --skip-builtin-train \
        --skip-builtin-decode ${MODEL_FLAGS:-} ;;
    contention) step contention now "$here/scripts/dev/compile_contention.py" ;;
    first_step) step first_step now "$here/scripts/dev/first_step_timeline.py" ${TIMELINE_FLAGS:-} ;;
    host_time) step host_time now "$here/scripts/benchmark_kernels.py" --host-time ;;
    host_time@*) install_tree "${s#host_time@}"; step "${s/@/_}" tree "${s#host_time@}" benchmark_kernels.py --host-time ;;
    multi_gpu) step multi_gpu now "$here/scripts/benchmark_multi_gpu.py" ${MULTI_FLAGS:---bf16} ;;
    choice_now) step choice_now now "$here/scripts/dev/decode_step_choice.py" ${CHOICE_FLAGS:-} ;;
    few_rows) CAP=${SWEEP_CAP:-200} step few_rows_sweep now "$here/scripts/dev/few_rows_sweep.py"
        best=$(grep '^best: ' "$OUT/few_rows_sweep.txt" | cut -c7-)
        step few_rows_choice now "$here/scripts/dev/decode_step_choice.py" --shapes ${FEW_ROWS_SHAPES:-1.4b,7b} \
            --batches 1,16 --few-rows "$best" ;;
    choice@*) install_tree "${s#choice@}"; step "${s/@/_}" tree "${s#choice@}" dev/decode_step_choice.py ${CHOICE_FLAGS:-} ;;
    scan_before) install_tree before; step scan_before old "$before/scripts/benchmark_kernels.py" --no-torch-path --no-scaling --no-conv ;;
    model_now) step model_now now "$here/scripts/benchmark_model.py" --skip-builtin-train --skip-builtin-decode \
        ${MODEL_FLAGS:-} ;;
    model_like) step model_like now "$here/scripts/benchmark_model.py" --skip-builtin-train --skip-builtin-decode \
        --loss-outside ;;
    falcon_share) step falcon_share now "$here/scripts/benchmark_model.py" --skip-builtin-train --no-decode --falcon \
        --rounds 2 ;;
    model_before) install_tree before; step model_before old "$here/scripts/benchmark_model.py" --skip-builtin-train \
        --skip-builtin-decode ${MODEL_FLAGS:-} ;;
    qlora_now) step qlora_now now "$here/scripts/benchmark_large.py" --rows qlora --shapes ${QLORA_SHAPES:-7b} ;;
    qlora@*) install_tree "${s#qlora@}"; step "${s/@/_}" tree "${s#qlora@}" benchmark_large.py --rows qlora \
        --shapes ${QLORA_SHAPES:-7b} ;;
    large_*) step "$s" now "$here/scripts/benchmark_large.py" --shapes "${s#large_}" ${LARGE_FLAGS:-} ;;
    prefill) step prefill now "$here/scripts/benchmark_large.py" --shapes 130m,1.4b --rows prefill \
        --prefill-lengths ${PREFILL_LENGTHS:-1024,8192,65536} ;;
    prefill@*) install_tree "${s#prefill@}"; step "${s/@/_}" tree "${s#prefill@}" benchmark_large.py \
        --shapes 130m,1.4b --rows prefill --prefill-lengths ${PREFILL_LENGTHS:-1024,8192,65536} ;;
    prefill_profile) step prefill_profile now "$here/scripts/dev/prefill_profile.py" ${PROFILE_FLAGS:-} ;;
    prefill_profile@*) install_tree "${s#prefill_profile@}"; step "${s/@/_}" tree "${s#prefill_profile@}" \
        dev/prefill_profile.py ${PROFILE_FLAGS:-} ;;
    decode_profile) step decode_profile now "$here/scripts/benchmark_model.py" --no-train --skip-builtin-decode \
        --decode-profile ${MODEL_FLAGS:-} ;;
    induction) step induction now "$here/scripts/induction_heads.py" --steps 5000 --solved-streak 0 \
        --out-dir /tmp/induction ;;
    induction_paper) step induction_paper now "$here/scripts/induction_heads.py" --curriculum-steps 0 --batch-size 8 \
        --lr 1e-3 --steps 40000 --solved-streak 0 --max-test-log2 ${INDUCTION_MAX_LOG2:-20} \
        --out-dir /tmp/induction_paper ;;
    long_context) step long_context now "$here/scripts/long_context.py" --out-dir /tmp/long_context ${LONG_FLAGS:-} ;;
    precision) step precision now "$here/scripts/precision_training.py" ${PRECISION_FLAGS:---runs fp32,bf16,fp16} \
        --out-dir /tmp/precision ;;
    *) echo "unknown step $s" ;;
    esac
done
