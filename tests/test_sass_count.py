"""benchmarks/sass_count.py without a GPU: the counts it prints are what the notes cite, so the
counter itself is pinned. It once kept only instructions at four-hex-digit addresses, which
capped every count at 4,096 (the session-8 count of the decode token select was that cap)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "sass_count.py"),
                          *args, "--top", "0"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.splitlines()


def test_counts_past_4096_instructions_and_reports_registers():
    usage, summary = _run("topk_fast", "--warps", "4", "--maxnreg", "168")[:2]
    assert usage.startswith("REG:168 ") and "STACK:" in usage, usage
    total = int(summary.split("sm_90: ")[1].split()[0])
    assert total > 4096, summary          # the fast top-k is about 7,400 SASS instructions


def test_constexpr_overrides_reach_the_compile():
    one = _run("token_scores", "--warps", "4", "--set", "STAGES=1")[0]
    two = _run("token_scores", "--warps", "4", "--set", "STAGES=2")[0]
    # depth 2 double-buffers the 16 KB key block in shared memory
    smem = [int(line.split("launch: ")[1].split()[0]) for line in (one, two)]
    assert smem[1] - smem[0] >= 16384, (one, two)


@pytest.mark.parametrize("kernel,args", [
    ("prefill_select", ("--warps", "4", "--maxnreg", "168")),
    ("token_select", ("--warps", "8", "--set", "BLOCK_SLOTS=1")),   # the decode default is 1-D
    ("token_scores", ("--warps", "4", "--set", "SELECT=1")),
])
def test_token_selects_fit_an_sm90_block(kernel, args):
    # The token selects' per-block slots store through shared memory (64 KB at 8,192
    # candidates): each must still compile for sm_90 within the 227 KB a block may take, and
    # the capped select must not spill more than a few words (8 bytes when this was written).
    usage, summary = _run(kernel, *args)[:2]
    smem = int(usage.split("launch: ")[1].split()[0])
    stack = int(usage.split("STACK:")[1].split()[0])
    assert smem <= 227 * 1024, usage
    if kernel == "prefill_select":
        assert stack <= 64, usage
    assert "SASS instructions" in summary, summary

