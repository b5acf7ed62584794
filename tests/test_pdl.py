"""Programmatic dependent launch (hisa/ops/pdl.py) without a GPU: the flag is off on the CPU,
and the decode kernels compiled for sm_90 carry the grid-dependency wait exactly when asked
(a kernel launched with PDL that lost its wait would read its predecessor's output early)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hisa.ops.pdl import pdl_launch, pdl_supported

triton = pytest.importorskip("triton")


def test_pdl_is_off_off_the_gpu():
    assert not pdl_supported(torch.device("cpu"))
    assert pdl_launch(False) == {}
    assert pdl_launch(True) == {"launch_pdl": True}


#: Compiles the two decode selections for sm_90 (small shapes: fast) with PDL on and off, in
#: a process without TRITON_INTERPRET (the test session's kernels are interpreted, which
#: compiles nothing), and prints which grid-dependency instructions each PTX holds.
_COMPILE = r"""
import json
from hisa.testing.sm90 import compile_sm90

small = {"token_select": dict(B=64, M=4, MB_PAD=256, K=64, K_PAD=64),
         "block_select": dict(B=64, M=4, M_PAD=4, NB_PAD=64)}
out = {}
for name, shape in small.items():
    for pdl in (False, True):
        ptx = compile_sm90(name, 4, pdl=pdl, **shape).asm["ptx"]
        out[f"{name} {pdl}"] = [op for op in ("griddepcontrol.wait",
                                              "griddepcontrol.launch_dependents") if op in ptx]
print(json.dumps(out))
"""


def test_decode_kernels_wait_exactly_under_pdl():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["token_select False"] == [] and got["block_select False"] == []
    # every PDL launch waits; the block select also lets the token stage in early, the last
    # kernel has no dependent of its own
    assert got["token_select True"] == ["griddepcontrol.wait"]
    assert got["block_select True"] == ["griddepcontrol.wait", "griddepcontrol.launch_dependents"]
