#!/usr/bin/env bash
# Interleaved A/B of the host cost of prefill calls: a base tree against this checkout.
#
#   bash benchmarks/make_ab_base.sh COMMIT        # on the CPU machine: ab_base/ = COMMIT's hisa/
#   bash benchmarks/host_ab.sh ab_base OUT_DIR    # on the device (carry: ["ab_base"])
#
# Two rounds, base then checkout each round: `hisa bench` prefill_chunk 16K / 128K and
# prefill 8K (`--no-stages`), then benchmarks/host_probe.py (host time, event time and the
# CPU-side ops of one call). Each tree runs from inside itself with `python3 -m` / stdin, so
# it imports its own `hisa`. Everything goes into OUT_DIR.tgz (the device returns 8 files).
set -u
base=${1:?base tree}
# Absolute: the bench writes its rows from inside each tree.
out=$(mkdir -p "${2:?output folder}" && cd "$2" && pwd)
repo=$(pwd)
for round in 1 2; do
  for tree in "$base" .; do
    tag=$([ "$tree" = . ] && echo head || echo base)$round
    (cd "$tree" && PYTHONPATH=. python3 -m hisa.cli bench --mode prefill_chunk \
        --contexts 16k,128k --no-stages --commit "$tag" --out "$out/ab.jsonl" &&
      PYTHONPATH=. python3 -m hisa.cli bench --mode prefill --contexts 8k --no-stages \
        --commit "$tag" --out "$out/ab.jsonl") > "$out/bench_$tag.log" 2>&1
    grep -E "^prefill" "$out/bench_$tag.log" | sort -u | sed "s/^/$tag /"
    (cd "$tree" && PYTHONPATH=. python3 - "$tag" "$out/probe.jsonl" \
        < "$repo/benchmarks/host_probe.py") > "$out/probe_$tag.log" 2>&1
    grep "^== " "$out/probe_$tag.log"
  done
done
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
