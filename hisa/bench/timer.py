"""One timer for every benchmark: CUDA events, warm-up, median of many runs.

Options: ``cold_l2`` overwrites a buffer larger than L2 before each run so the timed op starts
with a cold cache; ``cuda_graph`` captures the op once and times graph replays, which removes
launch gaps (decode). On CPU it falls back to ``time.perf_counter``.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

L2_FLUSH_BYTES = 256 * 2**20  # larger than the 50-60 MB L2 of an H100/H200


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _summarise(samples: list[float]) -> Timing:
    samples = sorted(samples)
    n = len(samples)
    return Timing(statistics.median(samples), samples[int(0.2 * (n - 1))],
                  samples[int(0.8 * (n - 1))], n)


def time_op(fn: Callable[[], object], *, warmup: int = 3, runs: int = 20,
            max_seconds: float = 5.0, cold_l2: bool = False, cuda_graph: bool = False
            ) -> Timing:
    """Median time of ``fn()`` in milliseconds.

    ``runs`` is an upper bound: timing stops early once ``max_seconds`` of measured time
    has accumulated (at least 3 runs are always taken), which keeps 128K shapes affordable.
    """
    if not torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if sum(samples) > max_seconds * 1e3 and len(samples) >= 3:
                break
        return _summarise(samples)

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    call = fn
    if cuda_graph:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()                                            # warm on the capture stream
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        call = graph.replay
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda") if cold_l2 else None
    samples = []
    for _ in range(runs):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
        if sum(samples) > max_seconds * 1e3 and len(samples) >= 3:
            break
    return _summarise(samples)
