"""Backend choice shared by the public ops: "torch" references or "triton" kernels."""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable

import torch

from .validate import check_backend


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device,
                    kernel_check: Callable[[], None] | None = None) -> str:
    """"auto" picks Triton for CUDA tensors when Triton is installed, else the torch reference.

    "triton" is accepted for CPU tensors only under ``TRITON_INTERPRET=1``. ``kernel_check``
    raises ValueError for shapes the kernels do not support (a head count that is not a power
    of two, say): "auto" then falls back to the reference, which handles any shape, while an
    explicit "triton" lets the kernel's ValueError reach the caller.
    """
    check_backend(backend)
    if backend == "torch":
        return "torch"
    usable = triton_installed() and (device.type == "cuda" or triton_interpreting())
    if backend == "auto":
        if not (usable and device.type == "cuda"):
            return "torch"
        try:
            if kernel_check is not None:
                kernel_check()
        except ValueError:
            return "torch"
        return "triton"
    if not triton_installed():
        raise ValueError("backend: 'triton' requested but the triton package is not installed "
                         "(pip install 'hisa[triton]')")
    if not usable:
        raise ValueError(f"backend: 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got "
                         f"tensors on {device}")
    return "triton"
