"""Programmatic dependent launch (PDL) for chains of small dependent kernels (Hopper and later).

A decode step is a chain of short launches, each reading what the one before wrote. With PDL
(``launch_pdl=True``) a kernel's programs may be scheduled while the kernel before it still
runs; each waits at :func:`pdl_wait` (``griddepcontrol.wait``: the previous grid has finished
and its writes are visible) before touching the previous kernel's outputs, so the launch and
the programs' prologue overlap the tail of the previous kernel instead of following it. A
kernel calls :func:`pdl_trigger` to let its dependent be scheduled before it ends.

Rules every kernel of a chain keeps (else a read races a write):

* every program executes :func:`pdl_wait` before its first read of an earlier kernel's output
  and before any write (a program that returns without waiting would let its grid finish
  before the grid it depends on, and the wait of the next kernel only covers its own
  predecessor);
* before the wait, only inputs written before the chain's first kernel are read.

The first kernel of a chain is launched normally: what precedes it (the caller's kernels) is
ordered by the stream as usual. Off the GPU (the Triton interpreter) and before sm_90 the
flag is off and both helpers compile to nothing.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..utils.backend import triton_interpreting


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with PDL (a CUDA GPU of sm_90 or later,
    not the interpreter)."""
    if device.type != "cuda" or triton_interpreting():
        return False
    return _sm90_or_later(device.index if device.index is not None
                          else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm90_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_launch(pdl: bool) -> dict:
    """Launch options of a dependent kernel: ``launch_pdl`` only when on (the interpreter's
    launcher knows no such option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the previous kernel of the chain has finished (no-op when ``PDL`` is off)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel of the chain be scheduled now (no-op when ``PDL`` is off)."""
    if PDL:
        gdc_launch_dependents()


__all__ = ["pdl_launch", "pdl_supported", "pdl_trigger", "pdl_wait"]
