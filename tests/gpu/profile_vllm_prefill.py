"""Where the vLLM prefill plugin's time goes against the direct ops (one chunk, 32K keys,
4,096 queries): CUDA kernel time by kernel and host time of one call each, from torch.profiler.

    PYTHONPATH=. python3 tests/gpu/profile_vllm_prefill.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

from tests.gpu.engines_overhead import prefill_case


def main() -> None:
    plugin, direct, ok, _ = prefill_case(context=32768, queries=4096)
    print("same selection:", ok)
    for name, fn in (("plugin", plugin), ("direct", direct)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        print(f"== {name}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
