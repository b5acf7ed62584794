#!/usr/bin/env bash
# The GPU tier in one device call: selftest, GPU tests, then the benchmark sweep.
# Usage (on the device machine, from the repo root): bash benchmarks/run_gpu.sh COMMIT [bench args...]
# Writes bench rows, the plot and logs under $OUT (default: benchmarks/results/).
set -uo pipefail
commit=${1:-unknown}; shift || true
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -m hisa.cli selftest 2>&1 | tee "$out/selftest.log"
python3 -m pytest -q -x tests/gpu 2>&1 | tail -n 30 | tee "$out/gpu_tests.log"
python3 -m hisa.cli bench --commit "$commit" --out "$out/bench.jsonl" "$@" 2>&1 | tee "$out/bench.log"
# The 256K-1M regime (three levels beside two and flat) when asked: LONG_CONTEXT=1.
if [ "${LONG_CONTEXT:-0}" = 1 ]; then OUT="$out" bash benchmarks/run_long_context.sh "$commit"; fi
