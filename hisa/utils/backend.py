"""Backend choice shared by the public ops: "torch" references or "triton" kernels."""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
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


def _cuda_index(t) -> int | None:
    """The CUDA device index of tensor ``t``, None for anything else."""
    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
        return t.device.index if t.device.index is not None else torch.cuda.current_device()
    return None


def on_device_of(t):
    """A context in which the CUDA device of tensor ``t`` is current (a no-op when it already
    is, or ``t`` is not a CUDA tensor): see :func:`runs_on_device_of`."""
    index = _cuda_index(t)
    if index is not None and index != torch.cuda.current_device():
        return torch.cuda.device(index)
    return contextlib.nullcontext()


def runs_on_device_of(arg: str):
    """Decorator of a public op: while it runs, the CUDA device of its tensor argument ``arg``
    is the current one.

    Triton launches a kernel on the current device and its current stream, not on the device
    of the tensors it is given: with the tensors on cuda:1 and cuda:0 current (a model spread
    over two GPUs, a layer on the second) the launch fails ("cannot be accessed from Triton")
    or, with peer access, runs on the other device's stream, unordered with the torch ops that
    wrote its inputs. The guard is entered only when the devices differ, so a call on the
    current device pays one device query.
    """
    def wrap(fn):
        position = list(inspect.signature(fn).parameters).index(arg)

        @functools.wraps(fn)
        def on_device(*args, **kwargs):
            with on_device_of(args[position] if position < len(args) else kwargs.get(arg)):
                return fn(*args, **kwargs)

        on_device.runs_on_device_of = arg
        return on_device
    return wrap
