#!/usr/bin/env bash
# One measured round on the GPU machine, in phases that each fit one 10-minute device call.
#
#   bash scripts/dev/device_round.sh check               # install, GPU tests (verbose), kernel benchmark
#   bash scripts/dev/device_round.sh model BEFORE_COMMIT # 130M training/decode/prefill: BEFORE_COMMIT and now
#   bash scripts/dev/device_round.sh large 7b|1.4b       # benchmark_large at one shape (QLoRA needs bitsandbytes)
#   bash scripts/dev/device_round.sh reliability         # long_context, fp32/bf16/fp16 training
#
# Expects (carried in .device_cache/, which git ignores): peers/ (a copy of ../shared/peers, mamba_ssm) and,
# for QLoRA rows, bnb/*.whl (`pip download --no-deps bitsandbytes`); BEFORE_COMMIT checked out as a worktree
# in .device_cache/before (`git worktree add -f .device_cache/before BEFORE_COMMIT`). Results go to $OUT.
set -uo pipefail
OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation . >/dev/null
if [ -d .device_cache/bnb ]; then
    python3 -m pip install -q --no-deps --target /tmp/site .device_cache/bnb/*.whl && export PYTHONPATH=/tmp/site
fi
[ -f .device_cache/peers/activate.sh ] && source .device_cache/peers/activate.sh

case "${1:-check}" in
check)
    python3 -m pytest -p no:cacheprovider -q -n 8 -rfE tests 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
    python3 scripts/benchmark_kernels.py --no-scaling 2>&1 | tee "$OUT/kernels.txt"
    ;;
model)
    before=.device_cache/before
    [ -d "$before" ] && python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/before "$before"
    for round in 1 2; do  # alternate, so drift hits both sides alike
        if [ -d "$before" ]; then
            # The old tree's own script (its flags), on the old package.
            (cd /tmp && PYTHONPATH=/tmp/before python3 "$OLDPWD/$before/scripts/benchmark_model.py" --rounds 1 \
                --skip-builtin-train) 2>&1 | tee "$OUT/model_before_$round.txt"
        fi
        python3 scripts/benchmark_model.py --rounds 1 --skip-builtin-train --skip-builtin-decode 2>&1 \
            | tee "$OUT/model_now_$round.txt"
    done
    ;;
large)
    python3 scripts/benchmark_large.py --shapes "${2:-1.4b}" --out "$OUT/large_${2:-1.4b}.md" 2>&1 | tail -60
    ;;
reliability)
    python3 scripts/long_context.py 2>&1 | tail -30 | tee "$OUT/long_context.txt"
    python3 scripts/precision_training.py --runs fp32,bf16,fp16 --out-dir "$OUT/precision" 2>&1 | tail -30 | tee "$OUT/precision.txt"
    ;;
*)
    echo "unknown phase $1 (check, model, large, reliability)" >&2
    exit 2
    ;;
esac
