#!/usr/bin/env bash
# Same-run A/B of the selection kernels: a base tree's hisa/ against this checkout's.
#
#   bash benchmarks/make_ab_base.sh COMMIT        # on the CPU machine: ab_base/ = COMMIT's hisa/
#   bash benchmarks/kernel_ab.sh ab_base OUT_DIR  # on the device (carry: ["ab_base"])
#
# ROUNDS (default 1) rounds of base then head: benchmarks/select_probe.py --caps (the prefill
# token select, uncapped and capped, radix 0 and 1, outputs checked), decode_probe.py --variants
# (the decode step's variants, checked) and `hisa bench --mode prefill` at $AB_CONTEXTS
# (default 12k,16k,64k; every point through the bench's gate). The probes are this checkout's
# scripts; each tree's `hisa` comes first on their path (PYTHONPATH; a script's own folder,
# benchmarks/, holds no package), and the bench runs from inside each tree (`python3 -m` puts
# the working folder first). About 330 s a round. Everything goes into OUT_DIR.tgz.
set -u
base=${1:?base tree}
# Absolute: the bench writes its rows from inside each tree.
out=$(mkdir -p "${2:?output folder}" && cd "$2" && pwd)
repo=$(pwd)
failed=0
for round in $(seq 1 "${ROUNDS:-1}"); do
  for tree in "$base" .; do
    tag=$([ "$tree" = . ] && echo head || echo base)$round
    root=$(cd "$tree" && pwd)
    PYTHONPATH=$root python3 "$repo/benchmarks/select_probe.py" --caps \
      > "$out/select_$tag.log" 2>&1 || failed=1
    sed "s/^/$tag /" "$out/select_$tag.log" | grep "select_tokens"
    mkdir -p "$out/variants_$tag"
    PYTHONPATH=$root python3 "$repo/benchmarks/decode_probe.py" --variants \
      --out "$out/variants_$tag" > "$out/variants_$tag.log" 2>&1 || failed=1
    sed "s/^/$tag /" "$out/variants_$tag.log" | grep -E "^$tag +[0-9]"
    (cd "$tree" && PYTHONPATH=. python3 -m hisa.cli bench --mode prefill \
        --contexts "${AB_CONTEXTS:-12k,16k,64k}" --commit "$tag" --out "$out/ab.jsonl") \
      > "$out/bench_$tag.log" 2>&1 || failed=1
    grep -E "^prefill" "$out/bench_$tag.log" | sort -u | sed "s/^/$tag /"
  done
done
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
exit $failed          # 1 when a probe or the bench failed (its log in the tarball says how)
