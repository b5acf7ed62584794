#!/usr/bin/env bash
# compute-sanitizer over the GPU test tier: memcheck (out-of-bounds and misaligned accesses,
# leaks of device memory errors) and racecheck (shared-memory hazards), one pytest run per tool
# and test selection, each with its own log. Exits non-zero when any run reports an error or a
# test fails, and says which.
#
#   tests/gpu/sanitize.sh [LOG_DIR]        (from the repository root; LOG_DIR: sanitize-logs)
#   SANITIZE_ONLY="memcheck-fuzz racecheck-prefill" tests/gpu/sanitize.sh [LOG_DIR]
#                                          (only the named runs, to finish a run cut short)
#
# Sizes: the selections below are the GPU tests minus the 2**24-key ones, and the fuzzer with
# a few examples per op (--fuzz-examples); memcheck runs them in a few minutes, racecheck (much
# slower) gets a smaller set. PyTorch's caching allocator is off so that every tensor is its own
# allocation and an access past a tensor is an access past an allocation, which memcheck sees;
# CUDA-graph tests run separately with it on (with it off, an allocation during capture is a
# cudaMalloc, which capture forbids), so there memcheck sees only accesses past the pool.
set -u
cd "$(dirname "$0")/../.."
LOG_DIR="${1:-sanitize-logs}"
mkdir -p "$LOG_DIR"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

if ! command -v compute-sanitizer >/dev/null; then
    echo "sanitize.sh: compute-sanitizer is not on the PATH" >&2
    exit 2
fi

status=0
run() {
    local tool="$1" name="$2"
    shift 2
    local log="$LOG_DIR/$tool-$name.log"
    if [ -n "${SANITIZE_ONLY:-}" ] && [[ " $SANITIZE_ONLY " != *" $tool-$name "* ]]; then
        return
    fi
    echo "== $tool $name: pytest $*"
    env ${CACHING:+-u PYTORCH_NO_CUDA_MEMORY_CACHING} \
    compute-sanitizer --tool "$tool" --error-exitcode 86 \
        --log-file "$log" python3 -m pytest -q -p no:cacheprovider "$@" > "$log.pytest" 2>&1
    local rc=$?
    tail -n 3 "$log.pytest"
    if grep -q "Device not supported" "$log" "$log.pytest" 2>/dev/null; then
        echo "sanitize.sh: compute-sanitizer does not support this device (gVisor runtime?)" >&2
        exit 2
    fi
    local summary
    summary=$(grep -h "ERROR SUMMARY" "$log" | tail -n 1)
    echo "   ${summary:-no ERROR SUMMARY line} (exit $rc; log $log)"
    if [ "$rc" -ne 0 ] || ! echo "$summary" | grep -q "ERROR SUMMARY: 0 errors"; then
        status=1
    fi
}

run memcheck prefill tests/gpu/test_prefill_gpu.py
run memcheck decode tests/gpu/test_decode_gpu.py -k "not graph"
CACHING=1 run memcheck graphs tests/gpu/test_decode_gpu.py -k graph
run memcheck hardening tests/gpu/test_hardening_gpu.py -k "not past_2_24"
run racecheck prefill tests/gpu/test_prefill_gpu.py -k hisa_stages_match_naive
run racecheck decode tests/gpu/test_decode_gpu.py -k hisa_paged_decode_matches_reference
run racecheck hardening tests/gpu/test_hardening_gpu.py -k duplicate
# The fuzzer is the slowest under the sanitizer (every drawn shape compiles and runs its
# kernels under instrumentation; all of it at 6 examples did not finish in 540 s on an H200),
# so it runs last, one op family per run, each resumable through SANITIZE_ONLY.
run memcheck fuzz-exact tests/gpu/test_fuzz_gpu.py -k exact_inputs
run memcheck fuzz-prefill tests/gpu/test_fuzz_gpu.py -k prefill --fuzz-examples 4
run memcheck fuzz-decode tests/gpu/test_fuzz_gpu.py -k decode --fuzz-examples 4
run memcheck fuzz-append tests/gpu/test_fuzz_gpu.py -k append --fuzz-examples 4
run racecheck fuzz-decode tests/gpu/test_fuzz_gpu.py -k decode --fuzz-examples 2
if [ "$status" -ne 0 ]; then
    echo "sanitize.sh: errors reported (see $LOG_DIR)" >&2
fi
exit "$status"
