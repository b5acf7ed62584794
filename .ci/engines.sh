#!/usr/bin/env bash
# Install the engine releases the HISA plugins are pinned to, for the drift tests
# (tests/integrations/test_vllm_drift.py, test_sglang_drift.py). --no-deps: their dependency
# trees pull CUDA builds of torch; the drift tests only read the installed source files and
# import the few modules that need nothing else. Run it in the test venv after the README's
# install command; without it those tests skip with a reason.
set -euo pipefail
python -m pip install --no-deps "vllm==0.33.0" "sglang==0.5.23"
python - <<'PY'
import importlib.metadata as md
for name, want in (("vllm", "0.33.0"), ("sglang", "0.5.23")):
    got = md.version(name)
    assert got == want, f"{name}: installed {got}, the plugins are pinned to {want}"
    print(f"{name} {got}")
PY
