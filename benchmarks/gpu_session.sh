#!/usr/bin/env bash
# One device call, several owed GPU steps (benchmarks/gpu_owed.md), each under its own time
# limit so that one slow step cannot eat the call: a step that runs out is reported and the
# next one starts. Every step writes its log (and its JSON rows, where it has any) under $OUT.
#
#   bash benchmarks/gpu_session.sh COMMIT BUDGET_S STEP [STEP ...]
#
# BUDGET_S bounds the whole call (keep it under the device's per-call limit); each step gets
# the smaller of its own limit and what is left. Steps, with their limits in seconds:
#   prefill_tests  tests/gpu/test_prefill_gpu.py + test_super_gpu.py      (330)
#   pooled_cost    benchmarks/pooled_format_cost.py                       (300)
#   reps_prec      pooled_format_cost.py --precision (1M chunk, rep dots)   (330)
#   bench          hisa bench, prefill 8k/64k/128k and chunk 16k/128k     (240)
#   engines        tests/gpu/test_engines_gpu.py                          (150)
#   fuzz           tests/gpu/test_fuzz_gpu.py -k "exact_inputs or prefill" (200)
#   fuzz_decode    tests/gpu/test_fuzz_gpu.py -k 'decode or append'     (200)
#   super_peak     tests/gpu/test_super_gpu.py -k peak (workspace model)  (120)
#   replay         tests/gpu/replay_fuzz.py --list, then --all             (300)
#   hardening      tests/gpu/test_hardening_gpu.py                        (200)
#   overhead       tests/gpu/engines_overhead.py                          (240)
#   flat_probe     benchmarks/flat_probe.py                               (150)
#   decode_tests   tests/gpu/test_decode_gpu.py                           (200)
#   long           SKIP_TESTS=1 benchmarks/run_long_context.sh            (330)
#   sanitize       tests/gpu/sanitize.sh                                  (540)
#   profile_vllm   tests/gpu/profile_vllm_prefill.py (kernel vs host time) (120)
#   san_race       sanitize.sh, racecheck-kernels only (16 cases, ~25 s each) (540)
#   san_fuzz       sanitize.sh, the memcheck fuzz families + racecheck-fuzz-decode (540)
#   decode_variants benchmarks/decode_probe.py --variants (selection radix 1/2/8, fused) (200)
#   select_probe   benchmarks/select_probe.py (prefill token select: warps, radix 1/8) (150)
#   chunk_select   select_probe.py --chunk (1,024-query chunks: select settings, stages, call) (200)
#   topk_probe     benchmarks/topk_probe.py (flat top-k: fast kernel settings vs general) (240)
#   stages_probe   benchmarks/stages_probe.py (prefill loops pipelined 1/2/3, checked)  (300)
#   flat_tests     the GPU tests of the flat kernels (prefill top-k and logits, paged decode) (150)
#   select_stages  benchmarks/decode_probe.py --select (each decode launch alone, warps) (150)
#   bench_all      hisa bench: decode grid, prefill 8k-128k, chunks 16k-128k   (540)
#   table_probe    benchmarks/decode_probe.py --table (block tables of engine width) (150)
#   host_ab        benchmarks/host_ab.sh ab_base (make_ab_base.sh first; carry ab_base) (330)
#   trip_probe     benchmarks/token_trip_probe.py (token loop trip, block stage margin, flat) (300)
#   bench_prefill  hisa bench, prefill $BENCH_CONTEXTS (default 16k-128k, where HISA prunes) (330)
#   long_decode    hisa bench, decode at 1M x batch 1/8/32, flat / 2 levels / 3 levels (200)
#   bench_chunk    hisa bench, 1,024-query chunks at $CHUNK_CONTEXTS (default 16k,64k,128k) (200)
#   kernel_ab      benchmarks/kernel_ab.sh ab_base: select / decode probes + prefill bench, base
#                  then head (make_ab_base.sh first; carry ab_base)                     (360)
# PACK=1 tars $OUT into $OUT.tgz at the end (the device returns at most 8 files).
# Exits 1 when any step failed or ran out of time (its log says how), 0 otherwise.
set -u
commit=${1:?commit}
budget=${2:?budget in seconds}
shift 2
out=${OUT:-gpu-session}
mkdir -p "$out"
export PYTHONPATH=.
start=$(date +%s)
failed=""
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  >> "$out/gpu.txt" 2>&1

step_cmd() {
  case "$1" in
    prefill_tests) echo "330 python3 -m pytest -q tests/gpu/test_prefill_gpu.py tests/gpu/test_super_gpu.py -rs -s" ;;
    pooled_cost) echo "300 python3 benchmarks/pooled_format_cost.py --commit $commit --out $out/pooled_format.jsonl" ;;
    reps_prec) echo "330 python3 benchmarks/pooled_format_cost.py --precision --commit $commit --out $out/reps_prec.jsonl" ;;
    bench) echo "240 bash -c 'python3 -m hisa.cli bench --mode prefill --contexts 8k,64k,128k --commit $commit --out $out/prefill.jsonl && python3 -m hisa.cli bench --mode prefill_chunk --contexts 16k,128k --commit $commit --out $out/prefill_chunk.jsonl'" ;;
    engines) echo "150 python3 -m pytest -q tests/gpu/test_engines_gpu.py -rs" ;;
    fuzz) echo "200 python3 -m pytest -q tests/gpu/test_fuzz_gpu.py -k 'exact_inputs or prefill' -x" ;;
    fuzz_decode) echo "200 python3 -m pytest -q tests/gpu/test_fuzz_gpu.py -k 'decode or append' -x" ;;
    super_peak) echo "120 python3 -m pytest -q tests/gpu/test_super_gpu.py -k peak -rs -s" ;;
    replay) echo "300 python3 tests/gpu/replay_fuzz.py --list > $out/replay_list.txt && head -1 $out/replay_list.txt && python3 tests/gpu/replay_fuzz.py --device cuda --all --keep-going --save-inputs $out/failing" ;;
    hardening) echo "200 python3 -m pytest -q tests/gpu/test_hardening_gpu.py -rs" ;;
    overhead) echo "240 python3 tests/gpu/engines_overhead.py --commit $commit --out $out/engines_overhead.jsonl" ;;
    flat_probe) echo "150 python3 benchmarks/flat_probe.py --out $out/flat_probe.jsonl --commit $commit" ;;
    decode_tests) echo "200 python3 -m pytest -q tests/gpu/test_decode_gpu.py -rs" ;;
    long) echo "330 env SKIP_TESTS=1 OUT=$out bash benchmarks/run_long_context.sh $commit" ;;
    sanitize) echo "540 bash tests/gpu/sanitize.sh $out/san" ;;
    profile_vllm) echo "120 python3 tests/gpu/profile_vllm_prefill.py" ;;
    select_probe) echo "150 python3 benchmarks/select_probe.py" ;;
    chunk_select) echo "200 python3 benchmarks/select_probe.py --chunk" ;;
    topk_probe) echo "240 python3 benchmarks/topk_probe.py --commit $commit --out $out/topk_probe.jsonl" ;;
    stages_probe) echo "300 python3 benchmarks/stages_probe.py --commit $commit --out $out/stages_probe.jsonl" ;;
    flat_tests) echo "150 python3 -m pytest -q tests/gpu/test_prefill_gpu.py tests/gpu/test_decode_gpu.py -k 'topk or dsa or flat' -rs" ;;
    select_stages) echo "150 python3 benchmarks/decode_probe.py --select --out $out/select_stages" ;;
    table_probe) echo "150 python3 benchmarks/decode_probe.py --table --commit $commit --out $out/table_probe" ;;
    pdl_probe) echo "200 python3 benchmarks/decode_probe.py --pdl --out $out/pdl_probe" ;;
    bench_all) echo "540 bash -c 'python3 -m hisa.cli bench --mode decode --commit $commit --out $out/decode.jsonl && python3 -m hisa.cli bench --mode prefill --commit $commit --out $out/prefill.jsonl && python3 -m hisa.cli bench --mode prefill_chunk --commit $commit --out $out/prefill_chunk.jsonl'" ;;
    trip_probe) echo "300 python3 benchmarks/token_trip_probe.py --commit $commit --out $out/trip_probe.jsonl" ;;
    bench_prefill) echo "330 python3 -m hisa.cli bench --mode prefill --contexts ${BENCH_CONTEXTS:-16k,32k,64k,128k} --commit $commit --out $out/prefill.jsonl" ;;
    long_decode) echo "200 python3 -m hisa.cli bench --mode decode --contexts 1024k --batches 1,8,32 --next-n 1 --no-auto --super-size 2,16 --super-topk 128,64 --commit $commit --out $out/long_decode.jsonl" ;;
    bench_chunk) echo "200 python3 -m hisa.cli bench --mode prefill_chunk --contexts ${CHUNK_CONTEXTS:-16k,64k,128k} --commit $commit --out $out/prefill_chunk.jsonl" ;;
    host_ab) echo "330 bash benchmarks/host_ab.sh ab_base $out/host_ab" ;;
    kernel_ab) echo "360 bash benchmarks/kernel_ab.sh ab_base $out/kernel_ab" ;;
    decode_variants) echo "200 python3 benchmarks/decode_probe.py --variants --out $out/decode_variants" ;;
    san_race) echo "540 env SANITIZE_ONLY=racecheck-kernels bash tests/gpu/sanitize.sh $out/san" ;;
    san_fuzz) echo "540 env 'SANITIZE_ONLY=memcheck-fuzz-exact memcheck-fuzz-prefill memcheck-fuzz-decode memcheck-fuzz-append racecheck-fuzz-decode' bash tests/gpu/sanitize.sh $out/san" ;;
    *) return 1 ;;
  esac
}

for step in "$@"; do
  spec=$(step_cmd "$step") || { echo "unknown step: $step" >&2; failed="$failed $step"; continue; }
  limit=${spec%% *}
  cmd=${spec#* }
  left=$(( budget - ($(date +%s) - start) ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "== $step: skipped, ${left} s left of the budget"
    continue
  fi
  t0=$(date +%s)
  timeout --kill-after=5 "$limit" bash -o pipefail -c "$cmd" > "$out/$step.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && failed="$failed $step"
  echo "== $step: rc $rc in $(( $(date +%s) - t0 )) s (limit $limit s)"
  tail -n 6 "$out/$step.log"
done
echo "== total $(( $(date +%s) - start )) s${failed:+, failed:$failed}"
if [ "${PACK:-0}" = 1 ]; then
  tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
fi
[ -z "$failed" ]
