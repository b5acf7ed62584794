#!/usr/bin/env bash
# The CPU fidelity rows committed under docs/results/gemma3_trained/ (trained Gemma-3-270M
# indexers; fp32 indexer operands, the ops' torch references). Each step writes its rows,
# per-layer rows, log and charts into its own folder.
# Usage, from the repository root: bash benchmarks/eval_cpu.sh [STEP ...]
#   default  the default run (`hisa eval`, Austen 4K)                      -> cpu_default_4k
#   8k       Austen, code, RAG at 8K, scaled budget, 1 haystack / RAG prompt -> cpu_8k
#   block    the block-level-KL indexers, Austen 8K, no needles             -> cpu_blockkl_8k
#   32k      Austen 32K, scaled budget and DSA defaults, no needles         -> cpu_32k
set -euo pipefail
R=docs/results/gemma3_trained
EVAL="nice -n 10 python -m hisa.cli eval"
BLOCK=hisa/distill/weights/gemma3-270m-blockkl
STEPS=${*:-default 8k block 32k}
run() {   # folder, eval arguments
    local out=$R/$1; shift
    mkdir -p "$out"
    $EVAL "$@" --out "$out" 2>&1 | tee "$out/eval.log"
}
for step in $STEPS; do
    case $step in
        default) run cpu_default_4k ;;
        8k)      run cpu_8k --documents austen code rag --contexts 8192 --needles 1 ;;
        block)   run cpu_blockkl_8k --indexer $BLOCK --documents austen --contexts 8192 \
                     --needles 0 ;;
        32k)     run cpu_32k --contexts 32768 --budgets scaled dsa --needles 0 ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
