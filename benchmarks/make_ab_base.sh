#!/usr/bin/env bash
# ab_base/ := the hisa/ package of COMMIT (git-ignored; send it to the device with
# carry: ["ab_base"]) for benchmarks/host_ab.sh.
set -eu
commit=${1:?commit}
rm -rf ab_base && mkdir ab_base
git archive "$commit" hisa | tar x -C ab_base
echo "ab_base/: hisa/ of $(git rev-parse --short "$commit")"
