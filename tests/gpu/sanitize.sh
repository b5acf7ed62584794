#!/usr/bin/env bash
# compute-sanitizer over the GPU tier: memcheck (out-of-bounds and misaligned accesses, leaks
# of device memory errors) over the GPU test files, and racecheck (shared-memory hazards) over
# tests/gpu/racecheck_kernels.py, which launches every Triton kernel of hisa once at its
# smallest shape, and over a few fuzzed decode cases; one run per tool and selection, each with
# its own log. Exits non-zero when any run reports an error or a test or case fails, and says
# which.
#
#   tests/gpu/sanitize.sh [LOG_DIR]        (from the repository root; LOG_DIR: sanitize-logs)
#   SANITIZE_ONLY="memcheck-fuzz-exact racecheck-kernels" tests/gpu/sanitize.sh [LOG_DIR]
#                                          (only the named runs, to finish a run cut short)
#
# Sizes: the memcheck selections are the GPU tests minus the 2**24-key ones, and the fuzzer with
# a few examples per op (--fuzz-examples). racecheck instruments every shared-memory access of
# every kernel, torch's too, and does not finish the test files' shapes (the prefill
# selection ran past 380 s on an H200): it runs the kernel script instead (tiny shapes, one
# launch per kernel family), and the decode fuzzer at 2 examples. PyTorch's caching allocator is
# off so that every tensor is its own allocation and an access past a tensor is an access past
# an allocation, which memcheck sees; CUDA-graph tests run separately with it on (with it off,
# an allocation during capture is a cudaMalloc, which capture forbids), so there memcheck sees
# only accesses past the pool.
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
# run TOOL NAME COMMAND...: COMMAND (a python3 command line) under compute-sanitizer's TOOL,
# its output in LOG_DIR/TOOL-NAME.log.out and the sanitizer's report in LOG_DIR/TOOL-NAME.log.
run() {
    local tool="$1" name="$2"
    shift 2
    local log="$LOG_DIR/$tool-$name.log"
    if [ -n "${SANITIZE_ONLY:-}" ] && [[ " $SANITIZE_ONLY " != *" $tool-$name "* ]]; then
        return
    fi
    echo "== $tool $name: $*"
    env ${CACHING:+-u PYTORCH_NO_CUDA_MEMORY_CACHING} \
    compute-sanitizer --tool "$tool" --error-exitcode 86 \
        --log-file "$log" "$@" > "$log.out" 2>&1
    local rc=$?
    tail -n 3 "$log.out"
    if grep -q "Device not supported" "$log" "$log.out" 2>/dev/null; then
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
# The command line run() takes for a pytest selection (the selection's arguments follow).
PYTEST=(python3 -m pytest -q -p no:cacheprovider)

run memcheck prefill "${PYTEST[@]}" tests/gpu/test_prefill_gpu.py
run memcheck decode "${PYTEST[@]}" tests/gpu/test_decode_gpu.py -k "not graph"
CACHING=1 run memcheck graphs "${PYTEST[@]}" tests/gpu/test_decode_gpu.py -k graph
run memcheck hardening "${PYTEST[@]}" tests/gpu/test_hardening_gpu.py -k "not past_2_24"
run racecheck kernels python3 tests/gpu/racecheck_kernels.py --device cuda
# The fuzzer is the slowest under the sanitizer (every drawn shape compiles and runs its
# kernels under instrumentation; all of it at 6 examples did not finish in 540 s on an H200),
# so it runs last, one op family per run, each resumable through SANITIZE_ONLY.
run memcheck fuzz-exact "${PYTEST[@]}" tests/gpu/test_fuzz_gpu.py -k exact_inputs
run memcheck fuzz-prefill "${PYTEST[@]}" tests/gpu/test_fuzz_gpu.py -k prefill --fuzz-examples 4
run memcheck fuzz-decode "${PYTEST[@]}" tests/gpu/test_fuzz_gpu.py -k decode --fuzz-examples 4
# Appends arrive in chunks of down to one token: at the tier's 10,000 keys per request that is
# thousands of small appends, each a cudaMalloc per tensor here (1 example: 2 s on an H200; 4
# did not finish in 470 s), so this run draws requests of at most 2 x 256 keys.
run memcheck fuzz-append "${PYTEST[@]}" tests/gpu/test_fuzz_gpu.py -k append --fuzz-examples 4 \
    --fuzz-max-keys 256
run racecheck fuzz-decode "${PYTEST[@]}" tests/gpu/test_fuzz_gpu.py -k decode --fuzz-examples 2
if [ "$status" -ne 0 ]; then
    echo "sanitize.sh: errors reported (see $LOG_DIR)" >&2
fi
exit "$status"
