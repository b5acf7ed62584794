"""Where the vLLM prefill plugin's time goes against the direct ops (one chunk, 32K keys,
4,096 queries, the 4-layer step of engines_overhead.py): for each side, the step's wall time,
its host time (the call returning, before the GPU finishes), the GPU's busy time (the union of
kernel intervals), the longest idle gaps between kernels with the kernels on either side and
the host ops running during the gap, and CUDA time by kernel, from torch.profiler; then the
host functions by own time over 20 steps (cProfile).

    PYTHONPATH=. python3 tests/gpu/profile_vllm_prefill.py
"""
import cProfile
import pstats
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from tests.gpu.engines_overhead import prefill_case

#: Idle gaps reported per side.
GAPS = 8


def wall_and_host_ms(fn, runs: int = 20) -> tuple[float, float]:
    """Median wall time of ``fn`` to the GPU's end, and median host time of the call itself."""
    walls, hosts = [], []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        hosts.append((t1 - t0) * 1e3)
        walls.append((t2 - t0) * 1e3)
    walls.sort(), hosts.sort()
    return walls[runs // 2], hosts[runs // 2]


def kernel_timeline(prof) -> tuple[list, list]:
    """(kernels, host ops) as (start_us, end_us, name) sorted by start."""
    kernels, host = [], []
    for e in prof.events():
        span = (e.time_range.start, e.time_range.end, e.name)
        if e.device_type == DeviceType.CUDA:
            kernels.append(span)
        elif e.device_type == DeviceType.CPU:
            host.append(span)
    return sorted(kernels), sorted(host)


def report_gaps(kernels: list, host: list) -> None:
    """Print the GPU's busy and idle time over the profiled step and its longest gaps."""
    busy, gaps, end, last = 0.0, [], None, ""
    for s, e, name in kernels:
        if end is None or s >= end:
            if end is not None and s > end:
                gaps.append((s - end, last, name, end, s))
            busy += e - s
            end, last = e, name
        elif e > end:
            busy += e - end
            end, last = e, name
    span = kernels[-1][1] - kernels[0][0] if kernels else 0.0
    print(f"GPU span {span / 1e3:.3f} ms, busy {busy / 1e3:.3f} ms, "
          f"idle {(span - busy) / 1e3:.3f} ms over {len(gaps)} gaps")
    for gap, before, after, g0, g1 in sorted(gaps, reverse=True)[:GAPS]:
        during = sorted({n for s, e, n in host if s < g1 and e > g0 and not n.startswith("cuda")})
        print(f"  gap {gap:7.1f} us  after {before[:50]!r}  before {after[:50]!r}")
        print(f"      host ops during it: {', '.join(during[:10])}")


def main() -> None:
    plugin, direct, ok, _ = prefill_case(context=32768, queries=4096, layers=4)
    print("same selection:", ok)
    for name, fn in (("plugin", plugin), ("direct", direct)):
        for _ in range(3):
            fn()
        wall, host = wall_and_host_ms(fn)
        print(f"== {name}: wall {wall:.3f} ms per step, host {host:.3f} ms per step")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        report_gaps(*kernel_timeline(prof))
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                        max_name_column_width=60))
    for name, fn in (("plugin", plugin), ("direct", direct)):
        print(f"== {name}: host functions by own time, 20 steps")
        torch.cuda.synchronize()
        host = cProfile.Profile()
        host.enable()
        for _ in range(20):
            fn()
        host.disable()
        torch.cuda.synchronize()
        pstats.Stats(host).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
