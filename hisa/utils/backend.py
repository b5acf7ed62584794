"""Backend choice shared by the public ops: "torch" references or "triton" kernels."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .validate import check_backend


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" picks Triton for CUDA tensors when Triton is installed, else the torch reference.

    "triton" is accepted for CPU tensors only under ``TRITON_INTERPRET=1``.
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    usable = triton_installed() and (device.type == "cuda" or triton_interpreting())
    if backend == "auto":
        return "triton" if usable and device.type == "cuda" else "torch"
    if not triton_installed():
        raise ValueError("backend: 'triton' requested but the triton package is not installed "
                         "(pip install 'hisa[triton]')")
    if not usable:
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"tensors on {device}")
    return "triton"
