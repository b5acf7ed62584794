"""Host time against GPU time of single prefill calls, with the CPU-side events of one call.

Run it from inside the tree whose ``hisa`` it should measure, reading the script from stdin, so
that the tree's own package is the one imported (a script's own folder comes first on
``sys.path``: ``python3 ../host_probe.py`` would import the checkout's package instead):

    cd TREE && python3 - TAG OUT_JSONL < /path/to/benchmarks/host_probe.py

Per case: the host time of a call (from before the call to its return, the queue empty at the
start) and its time between CUDA events (what ``hisa bench`` reports), medians of 20; then the
top CPU-side ops of 5 calls under ``torch.profiler``. Each case's last 4 queries are first
compared with the torch backend's selection for them. ``benchmarks/host_ab.sh`` runs it over
two trees, interleaved.
"""
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import hisa

tag, out_path = sys.argv[1], sys.argv[2]
where = os.path.dirname(os.path.dirname(os.path.abspath(hisa.__file__)))
assert where == os.getcwd(), f"imported hisa from {where}, not from this tree ({os.getcwd()})"
torch.manual_seed(0)
dev = "cuda"
H, D, K = 64, 128, 2048


def inputs(T, S):
    q8, qs = hisa.quantize_fp8(torch.randn(T, H, D, device=dev))
    k8, kscale = hisa.quantize_fp8(torch.randn(S, D, device=dev))
    w = (torch.randn(T, H, device=dev) * qs.reshape(T, H) * H ** -0.5).contiguous()
    ke = torch.arange(S - T + 1, S + 1, dtype=torch.int32, device=dev)
    ks = torch.zeros(T, dtype=torch.int32, device=dev)
    return q8, k8, w, ks, ke, kscale


rows = []
for name, T, S, op in (("flat 8K", 8192, 8192, "flat"), ("hisa 8K", 8192, 8192, "hisa"),
                       ("flat chunk 16K", 1024, 16384, "flat"),
                       ("hisa chunk 16K", 1024, 16384, "hisa")):
    q8, k8, w, ks, ke, kscale = inputs(T, S)
    out = torch.empty(T, K, dtype=torch.int32, device=dev)
    fn = hisa.dsa_index if op == "flat" else hisa.hisa_index
    call = lambda: fn(q8, k8, w, ks, ke, k_scale=kscale, topk=K, out=out)   # noqa: E731
    call()
    # Correctness first: the last 4 queries against the torch backend on those rows alone
    # (a query's selection depends only on its own window); FP8 / tf32 near-ties may swap.
    r = slice(T - 4, T)
    ref = fn(q8[r], k8, w[r], ks[r], ke[r], k_scale=kscale, topk=K, backend="torch")
    got = [set(x) - {-1} for x in out[r].tolist()]
    hit = sum(len(g & (set(e) - {-1})) for g, e in zip(got, ref.tolist()))
    assert hit >= 0.99 * sum(len(g) for g in got), f"{name}: differs from the torch backend"
    for _ in range(4):
        call()
    host, total = [], []
    for _ in range(20):
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        call()
        e.record()
        t1 = time.perf_counter()
        e.synchronize()
        host.append((t1 - t0) * 1e3)
        total.append(s.elapsed_time(e))
    host.sort()
    total.sort()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=16,
                                      max_name_column_width=48)
    print(f"== {tag} {name}: host {host[10]:.3f} ms, events {total[10]:.3f} ms\n{table}",
          flush=True)
    rows.append({"tag": tag, "case": name, "host_ms": host[10], "events_ms": total[10],
                 "hisa_from": where, "gpu": torch.cuda.get_device_name()})
with open(out_path, "a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
