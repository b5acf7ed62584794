#!/usr/bin/env bash
# The multi-GPU tier in one device call (needs >= 2 GPUs): the distributed GPU tests, then the
# NCCL benchmark of hisa.distributed (sharded HISA vs single-GPU HISA vs sharded flat).
# Usage (on the device machine, from the repo root): bash benchmarks/run_distributed.sh COMMIT [bench args...]
# Writes the rows and logs under $OUT (default: benchmarks/results/).
set -uo pipefail
commit=${1:-unknown}; shift || true
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpus.txt"
nvidia-smi topo -m 2>&1 | tee "$out/topology.txt"
python3 -m pytest -q tests/gpu/test_distributed_gpu.py 2>&1 | tail -n 30 | tee "$out/distributed_gpu_tests.log"
python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/distributed_bench.py \
    --commit "$commit" --out "$out/distributed_h200x2.jsonl" "$@" 2>&1 | tee "$out/distributed_bench.log"
