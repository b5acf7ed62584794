"""Host-side cost of one call of a public op, counted deterministically (no timer, no GPU).

On a GPU the host enqueues work and moves on; its cost per call is what it does before the
queue drains: every host synchronisation (a device->host read: ``.item()``, ``.tolist()``,
``bool(t)``, ``int(t)``, ``.cpu()``, ``nonzero``, ``torch.unique``, a bool-mask index, ...)
stalls the CPU until the queue is empty and exposes the launch gap behind it, and every kernel
launch or small torch op costs a few microseconds of Python and driver time. Those are fixed
properties of the code path, so they can be counted on the CPU, where the Triton kernels run
under ``TRITON_INTERPRET=1``:

* ``syncs``: device->host reads, seen by a :class:`torch.overrides.TorchFunctionMode` at the
  Python call that makes them (one entry per call, whatever it does inside), with a
  :class:`~torch.utils._python_dispatch.TorchDispatchMode` fallback for reads made inside C++
  (``aten._local_scalar_dense``, ``aten.nonzero``, ...).
* ``launches``: Triton kernel launches (``kernel[grid](...)``: ``JITFunction.run`` compiled,
  ``InterpretedFunction.run`` under the interpreter), by kernel name.
* ``aten``: the aten ops the call dispatches outside the Triton launches, split into
  ``kernels`` (ops that launch device work or allocate), and ``views`` (metadata only).

Every entry carries its site: the innermost frame of the measured package (``hisa`` by
default, this module excluded) as ``module.function:line``, so a count that grows names the
function that grew it.

The device model: every tensor is treated as device-resident except the host copies the
call makes itself (the results of ``.cpu()`` / ``.to("cpu")`` and what is computed from them
alone); reads of host copies are not syncs. On a CPU ``.cpu()`` returns the tensor itself, so
while counting the mode hands back a clone instead (a device would return a new tensor too).
``Tensor.numpy()`` is never a sync: on a device it raises, so working code calls it on a host
copy. Work inside a Triton launch (the interpreter's own argument copies) is not counted.

Example:
    >>> with count_host_work() as work:
    ...     hisa.hisa_index(q, k, w, ks, ke, backend="triton")
    >>> work.num_syncs, work.num_launches, work.num_aten_kernels
    >>> print(work.report())
"""
from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: Tensor methods and torch functions whose result is read on the host, so that on a device
#: they wait for the queue: scalar reads, list reads, copies to the host, formatting, and
#: ops whose output size depends on the values (nonzero and friends allocate after a read).
SYNC_FUNCTIONS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__index__", "__float__", "__complex__",
    "__format__", "__repr__", "__str__", "cpu",
    "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select",
    "equal", "allclose", "is_nonzero",
})
#: aten ops that read device memory on the host when called from C++ (the fallback layer).
SYNC_ATEN = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::masked_select", "aten::equal", "aten::is_nonzero",
})
#: Functions that may read the host when an argument asks for it (bool masks, a cpu target).
_INDEXING = frozenset({"__getitem__", "__setitem__", "index_put_", "index_put"})


@dataclass(frozen=True)
class Event:
    """One counted thing: what (a function, kernel or aten op name) and where (the site);
    a launch also carries ``kernel``, the kernel's module-qualified name (two modules may
    name their kernels alike: ``_block_scores_kernel`` is both a prefill and a decode one)."""

    what: str
    site: str
    kernel: str = ""


@dataclass
class HostWork:
    """What one measured region did on the host (see the module docstring)."""

    syncs: list[Event] = field(default_factory=list)
    launches: list[Event] = field(default_factory=list)
    aten_kernels: list[Event] = field(default_factory=list)
    aten_views: list[Event] = field(default_factory=list)

    @property
    def num_syncs(self) -> int:
        return len(self.syncs)

    @property
    def num_launches(self) -> int:
        return len(self.launches)

    @property
    def num_aten_kernels(self) -> int:
        return len(self.aten_kernels)

    @property
    def num_aten_views(self) -> int:
        return len(self.aten_views)

    def by_site(self, kind: str) -> Counter:
        """Counter of ``site`` for one of 'syncs', 'launches', 'aten_kernels', 'aten_views'."""
        return Counter(e.site for e in getattr(self, kind))

    def by_what(self, kind: str) -> Counter:
        return Counter(e.what for e in getattr(self, kind))

    def summary(self) -> dict[str, int]:
        return {"syncs": self.num_syncs, "launches": self.num_launches,
                "aten_kernels": self.num_aten_kernels, "aten_views": self.num_aten_views}

    def report(self) -> str:
        """Human-readable totals, then each kind by site (most first)."""
        lines = [", ".join(f"{k} {v}" for k, v in self.summary().items())]
        for kind in ("syncs", "launches", "aten_kernels", "aten_views"):
            events = getattr(self, kind)
            if not events:
                continue
            lines.append(f"{kind}:")
            per = Counter((e.site, e.what) for e in events)
            for (site, what), n in sorted(per.items(), key=lambda x: (-x[1], x[0])):
                lines.append(f"  {n:4d}  {what:<34s} {site}")
        return "\n".join(lines)


def _package_dir(package: str) -> str:
    mod = sys.modules.get(package) or __import__(package)
    return os.path.dirname(os.path.abspath(mod.__file__)) + os.sep


class _Counter:
    """Shared state of the two modes and the launch hook."""

    def __init__(self, package: str):
        self.work = HostWork()
        self.root = _package_dir(package)
        self.package = package
        self.this = os.path.abspath(__file__)
        self.in_launch = 0          # > 0 inside a Triton launch (or a stand-in): not counted
        self.in_sync = 0            # > 0 inside a counted Python-level sync: no fallback count
        # id -> ref of each host copy: looked up by identity, never by Tensor.__eq__
        self.host: dict[int, weakref.ref] = {}

    def site(self) -> str:
        f = sys._getframe(1)
        while f is not None:
            path = os.path.abspath(f.f_code.co_filename)
            if path.startswith(self.root) and path != self.this:
                rel = path[len(self.root):-3].replace(os.sep, ".")
                return f"{self.package}.{rel}.{f.f_code.co_name}:{f.f_lineno}"
            f = f.f_back
        return "<outside>"

    def is_host(self, args, kwargs) -> bool:
        """True when the call reads only host copies (at least one tensor, all of them host)."""
        tensors = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        return bool(tensors) and all(self._held(t) for t in tensors)

    def _held(self, t: torch.Tensor) -> bool:
        ref = self.host.get(id(t))
        return ref is not None and ref() is t

    def mark_host(self, out) -> None:
        for t in _flatten(out):
            if isinstance(t, torch.Tensor):
                self.host[id(t)] = weakref.ref(t)


def _flatten(obj) -> Iterator:
    if isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _flatten(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _flatten(o)
    else:
        yield obj


def _name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


def _to_host(name: str, args, kwargs) -> bool:
    """``Tensor.to`` / ``copy_`` / ``torch.as_tensor``-like calls that target the CPU."""
    if name != "to":
        return False
    for a in list(args[1:]) + list(kwargs.values()):
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


def _bool_index(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype == torch.bool
               for a in _flatten(args[1:2]))


class _FunctionMode(TorchFunctionMode):
    def __init__(self, state: _Counter):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if st.in_launch:
            return func(*args, **kwargs)
        name = _name(func)
        host_args = st.is_host(args, kwargs)
        copy_out = name == "cpu" or _to_host(name, args, kwargs)
        is_sync = not host_args and (
            name in SYNC_FUNCTIONS or copy_out
            or (name in _INDEXING and _bool_index(args))
            or (name == "repeat_interleave" and "output_size" not in kwargs
                and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"),
                               torch.Tensor))
            or (name == "where" and len(args) + len(kwargs) == 1))
        if is_sync:
            st.work.syncs.append(Event(name, st.site()))
            st.in_sync += 1
        try:
            out = func(*args, **kwargs)
            if copy_out and isinstance(out, torch.Tensor) and out is args[0]:
                st.in_launch += 1           # the stand-in copy is not the call's work
                try:
                    out = out.clone()       # a device would return a new (host) tensor
                finally:
                    st.in_launch -= 1
        finally:
            if is_sync:
                st.in_sync -= 1
        if copy_out or host_args:
            st.mark_host(out)
        return out


class _DispatchMode(TorchDispatchMode):
    def __init__(self, state: _Counter):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        st = self.state
        if not st.in_launch and not st.is_host(args, kwargs):
            name = func._schema.name
            site = st.site()
            if name in SYNC_ATEN:
                if not st.in_sync:
                    st.work.syncs.append(Event(name, site))
            elif func.is_view or name in ("aten::detach", "aten::alias", "aten::lift_fresh"):
                st.work.aten_views.append(Event(name, site))
            else:
                st.work.aten_kernels.append(Event(name, site))
        return func(*args, **kwargs)


def _launch_classes() -> list[type]:
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
    except ImportError:         # pragma: no cover - triton is optional for the torch path
        return classes
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:         # pragma: no cover
        pass
    return classes


def _kernel_name(jitted) -> str:
    return getattr(getattr(jitted, "fn", None), "__name__", type(jitted).__name__)


def kernel_key(jitted) -> str:
    """``module.name`` of a ``@triton.jit`` function (compiled or interpreted)."""
    fn = getattr(jitted, "fn", None)
    return f"{getattr(fn, '__module__', '?')}.{_kernel_name(jitted)}"


@contextlib.contextmanager
def _hook_launches(state: _Counter):
    originals = [(cls, cls.__dict__["run"]) for cls in _launch_classes() if "run" in cls.__dict__]

    def wrap(run: Callable) -> Callable:
        def counted_run(self, *args, **kwargs):
            if kwargs.get("warmup"):
                return run(self, *args, **kwargs)
            if not state.in_launch:
                state.work.launches.append(Event(_kernel_name(self), state.site(),
                                                 kernel_key(self)))
            state.in_launch += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                state.in_launch -= 1
        return counted_run

    for cls, run in originals:
        setattr(cls, "run", wrap(run))
    sync = torch.cuda.synchronize

    def counted_sync(*a, **kw):
        if not state.in_launch:
            state.work.syncs.append(Event("torch.cuda.synchronize", state.site()))
        return sync(*a, **kw)
    torch.cuda.synchronize = counted_sync
    try:
        yield
    finally:
        torch.cuda.synchronize = sync
        for cls, run in originals:
            setattr(cls, "run", run)


@contextlib.contextmanager
def count_host_work(package: str = "hisa") -> Iterator[HostWork]:
    """Count host syncs, Triton launches and aten ops of the code run inside the block.

    Args:
        package: the package whose innermost frame names each event's site.

    Yields:
        the :class:`HostWork` being filled (complete when the block exits).
    """
    state = _Counter(package)
    with _hook_launches(state), _FunctionMode(state), _DispatchMode(state):
        yield state.work


@contextlib.contextmanager
def count_launches(package: str = "hisa") -> Iterator[HostWork]:
    """Only the Triton launches (and ``torch.cuda.synchronize`` calls) of the code run inside
    the block: no torch modes, so the torch work around the launches runs as it would
    unmeasured (tests/gpu/racecheck_kernels.py runs kernels under compute-sanitizer with it).
    """
    state = _Counter(package)
    with _hook_launches(state):
        yield state.work


def measure(fn: Callable[[], object], *, package: str = "hisa", warm: bool = True) -> HostWork:
    """:class:`HostWork` of one call of ``fn``; with ``warm`` it runs once before, so lazy
    imports and kernel compilation (one-time costs) are not counted."""
    if warm:
        fn()
    with count_host_work(package) as work:
        fn()
    return work
