#!/usr/bin/env bash
# The 256K-1M regime in one device call: the super-block GPU tests, then flat vs two-level vs
# three-level HISA (prefill chunks of 1,024 and 4,096 queries at 256K / 512K / 1M; decode batch
# 1 / 8 / 32 at 128K / 256K / 512K / 1M, next_n 1), every point checked against the reference
# on sampled rows before it is timed, then the fidelity study on synthetic keys at 1M.
# Two three-level settings are timed beside two levels and flat: super_size x super_topk
# 2 x 128 (the proposed default: fidelity first) and 16 x 64 (pruning first); override with
# SUPER_SIZES=2,16 SUPER_TOPKS=128,64.
# Usage (device machine, repo root): bash benchmarks/run_long_context.sh COMMIT
# Expected runtime on an H200: about 6 minutes (tests ~1.5 min, prefill ~1.5, decode ~1.5,
# fidelity ~1; much of it Triton compilation). SKIP_TESTS=1 / SKIP_FIDELITY=1 skip those parts.
# Writes under $OUT (default benchmarks/results/): long_prefill.jsonl, long_decode.jsonl,
# long_context_fidelity.jsonl, their logs, the plots and long_context.md (the tables).
set -uo pipefail
commit=${1:-unknown}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=.
super=(--super-size "${SUPER_SIZES:-2,16}" --super-topk "${SUPER_TOPKS:-128,64}")
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "GPU tests of the super-block level"
  python3 -m pytest -q -x tests/gpu/test_super_gpu.py 2>&1 | tail -n 30 | tee "$out/super_gpu_tests.log"
fi
stamp "prefill chunks"
python3 -m hisa.cli bench --mode prefill_chunk --contexts 256k,512k,1024k --queries 1024,4096 \
  "${super[@]}" --check-reps kernel --commit "$commit" --out "$out/long_prefill.jsonl" \
  --plot "$out/long_prefill.png" 2>&1 | tee "$out/long_prefill.log"
stamp "decode"
python3 -m hisa.cli bench --mode decode --contexts 128k,256k,512k,1024k --batches 1,8,32 \
  --next-n 1 --no-auto "${super[@]}" --commit "$commit" --out "$out/long_decode.jsonl" \
  --plot "$out/long_decode.png" 2>&1 | tee "$out/long_decode.log"
if [ "${SKIP_FIDELITY:-0}" != 1 ]; then
  stamp "fidelity at 1M"
  python3 benchmarks/long_context_fidelity.py --context 1m --queries 256 --commit "$commit" \
    --out "$out/long_context_fidelity.jsonl" 2>&1 | tee "$out/long_context_fidelity.log"
fi
python3 -m hisa.cli bench --report "$out/long_prefill.jsonl" "$out/long_decode.jsonl" \
  > "$out/long_context.md" 2>&1
stamp "done"
