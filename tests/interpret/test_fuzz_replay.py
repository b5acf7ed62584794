"""tests/gpu/replay_fuzz.py lists the cases a derandomized fuzz run draws only if running the
checks does not change what hypothesis draws. Hypothesis draws some integers from the
constants of the project's modules in sys.modules, so a check that imports a module on first
use changes the draws after it: the checks must import nothing that importing fuzz_cases did
not. Run in a fresh interpreter, where no other test has imported anything yet."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)

CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import replay_fuzz as R
R._load_interpreter_shims()
import torch
import fuzz_cases as F

def hisa_modules():
    return {m for m in sys.modules if m.split(".")[0] == "hisa"}

first = [R.case_key(c) for c in R.draw_cases()]
before = hisa_modules()
cpu = F.Profile("cpu", 0, 0, (), (), (), 0, ())
for dtype, strides in ((torch.float32, set()), (torch.float8_e4m3fn, {"q", "k_scale"})):
    F.check_prefill(dict(lens=[300, 40], qlens=[2, 1], heads=16, dim=64, dtype=dtype, topk=37,
                         block_size=16, block_topk=3, strides=strides,
                         nonfinite=("k", F.NAN), seed=1), cpu)          # pruning: the pipeline
F.check_decode(dict(lens=[300, 5], next_n=2, two_d=False, heads=16, dim=64,
                    q_dtype=torch.float32, block_size=64, block_topk=2, topk=37,
                    extra_columns=1, strides={"weights"}, nonfinite=None, seed=1), cpu)
F.check_append(dict(lens=[130, 5], block_size=64, dim=64, fp8_input=True, ue8m0=False,
                    max_chunk=64, padding=True, strided_scale=True, seed=1), cpu)
after = hisa_modules()
second = [R.case_key(c) for c in R.draw_cases()]
print(json.dumps(dict(imported=sorted(after - before),
                      same=sum(a == b for a, b in zip(first, second)), total=len(first))))
"""


def test_checks_do_not_change_the_draws():
    env = dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHILD, TESTS, os.path.join(TESTS, "gpu")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["imported"] == [], f"the checks imported {got['imported']} on first use"
    assert got["same"] == got["total"], \
        f"{got['total'] - got['same']} of {got['total']} cases drawn differently after the checks"
