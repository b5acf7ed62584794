#!/usr/bin/env bash
# The CPU fidelity rows committed under docs/results/gemma3_trained/ (trained Gemma-3-270M
# indexers; fp32 indexer operands, the ops' torch references). Each step writes its rows,
# per-layer rows and charts into its own folder; the whole script took about 3 hours on the
# shared 2-core CPU (see docs/fidelity.md for each step's time).
# Usage, from the repository root: bash benchmarks/eval_cpu.sh [STEP ...]
#   default  the default run (`hisa eval`, Austen 4K)
#   8k       Austen, code, RAG at 8K, scaled budget, 3 haystacks / RAG prompts x 3 questions
#   16k      Austen 16K, scaled budget and DSA defaults, 1 haystack x 3 needles
#   variants Austen 8K, every setting including the eval-only stage-1 variants, no needles
#   block    the block-level-KL indexers at Austen 8K (1 haystack) and 16K (DSA defaults)
set -euo pipefail
R=docs/results/gemma3_trained
EVAL="nice -n 10 python -m hisa.cli eval"
BLOCK=hisa/distill/weights/gemma3-270m-blockkl
STEPS=${*:-default 8k 16k variants block}
for step in $STEPS; do
    case $step in
        default)  $EVAL --out $R/default ;;
        8k)       $EVAL --documents austen code rag --contexts 8192 --needles 3 --out $R/8k ;;
        16k)      $EVAL --contexts 16384 --budgets scaled dsa --out $R/16k ;;
        variants) $EVAL --contexts 8192 --methods all --needles 0 --out $R/variants_8k ;;
        block)    $EVAL --indexer $BLOCK --contexts 8192 --out $R/blockkl_8k
                  $EVAL --indexer $BLOCK --contexts 16384 --budgets scaled dsa --needles 0 \
                      --out $R/blockkl_16k ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
