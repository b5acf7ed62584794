#!/usr/bin/env bash
# Prints the README's set-up commands, one per line: the indented lines (or the lines of fenced
# code blocks) of its "## Set up" section. The same parse as the project's readme-fresh check;
# .ci/run and tests/test_readme.py use this one copy.
set -euo pipefail
awk '/^## Set up/{s=1;next} /^## /{s=0} s && /^```/{f=!f;next}
  s && f && NF {print; next} s && !f && /^    [^ ]/{sub(/^    /,""); print}' "${1:-README.md}"
