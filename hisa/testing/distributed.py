"""Inputs and process launching for the sharded ops' tests and benchmarks.

``exact_*`` inputs are integer-valued FP8 keys and queries with dyadic weights and unit key
scales: every score, block mean and FP8 pooled row is then computed without rounding, so the
sharded ops must match the single-process references bit for bit (any summation order gives
the same sums), and scores tie often, which exercises the tie rule across ranks. Block means are
integers whose largest coordinate is 7 (paired per-token deviations cancel within a block), so
the cache's FP8 pooled rows (scale 7 / 448 = 1 / 64) are exact too.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import traceback
from typing import Callable

import torch

from ..cache.layout import PAGE_SIZE
from ..cache.paged import PagedIndexerCache
from ..utils.seqlens import windows_from_cu_seqlens
from ..utils.validate import FP8_DTYPE

#: Largest |deviation| of a token from its block's base key (|key| <= 7 + 8 = 15 stays exact
#: in FP8 e4m3).
EXACT_DEVIATION = 8
#: Dyadic head weights (exact products and sums).
EXACT_WEIGHTS = (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0)


def exact_keys(num_keys: int, head_dim: int, block_size: int, *, generator: torch.Generator,
               all_equal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued FP8 keys [S, D] with unit scales; block means are integer, amax 7.

    ``all_equal`` makes every key identical (every score of a query ties).
    """
    nb = -(-num_keys // block_size)
    base = torch.randint(-7, 8, (nb, head_dim), generator=generator).float()
    base[:, 0] = 7.0
    if all_equal and nb:
        base[:] = base[0]
    k = base.repeat_interleave(block_size, dim=0)[:num_keys]
    if not all_equal:
        half = torch.randint(-EXACT_DEVIATION, EXACT_DEVIATION + 1,
                             (-(-num_keys // 2), head_dim), generator=generator).float()
        half[:, 0] = 0.0
        dev = torch.stack([half, -half], dim=1).flatten(0, 1)[:num_keys]   # pairs cancel
        k = k + dev
    return k.to(FP8_DTYPE), torch.ones(num_keys)


def exact_queries(rows: int, heads: int, head_dim: int, *, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued FP8 queries [rows, H, D] in [-3, 3] and dyadic weights [rows, H]."""
    q = torch.randint(-3, 4, (rows, heads, head_dim), generator=generator).float()
    choice = torch.randint(0, len(EXACT_WEIGHTS), (rows, heads), generator=generator)
    return q.to(FP8_DTYPE), torch.tensor(EXACT_WEIGHTS)[choice]


def exact_packed_inputs(seq_lens: list[int], query_lens: list[int] | None = None, *,
                        heads: int = 4, head_dim: int = 32, block_size: int = 64, seed: int = 0,
                        all_equal: bool = False):
    """Packed prefill inputs (q, k, weights, ks, ke, k_scale) with exact arithmetic."""
    g = torch.Generator().manual_seed(seed)
    query_lens = list(seq_lens) if query_lens is None else list(query_lens)
    k, k_scale = exact_keys(sum(seq_lens), head_dim, block_size, generator=g,
                            all_equal=all_equal)
    q, w = exact_queries(sum(query_lens), heads, head_dim, generator=g)
    cu_q = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + list(seq_lens)).cumsum(0).to(torch.int32)
    ks, ke = windows_from_cu_seqlens(cu_q, cu_k)
    return q, k, w, ks, ke, k_scale


def build_cache(requests: list[tuple[torch.Tensor, torch.Tensor]], *, block_size: int,
                head_dim: int, seed: int, extra_columns: int = 1, extra_pages: int = 2,
                device="cpu", backend: str = "torch") -> tuple[PagedIndexerCache, torch.Tensor]:
    """A single-process paged cache holding ``requests`` [(keys fp8 [L, D], scales [L])] on
    shuffled pages, written by the cache's own append; unused block-table columns hold -1."""
    g = torch.Generator().manual_seed(seed)
    n_pages = [-(-k.shape[0] // PAGE_SIZE) for k, _ in requests]
    total = sum(n_pages) + extra_pages
    perm = torch.randperm(total, generator=g).to(torch.int32)
    cols = max(n_pages + [1]) + extra_columns
    table = torch.full((len(requests), cols), -1, dtype=torch.int32)
    cache = PagedIndexerCache(total, head_dim=head_dim, block_size=block_size, device=device)
    start = 0
    for b, n in enumerate(n_pages):
        table[b, :n] = perm[start:start + n]
        start += n
    table = table.to(device)
    for b, (k, s) in enumerate(requests):
        if k.shape[0] == 0:
            continue
        pos = torch.arange(k.shape[0], device=device)
        slots = table[b, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
        req = torch.full((k.shape[0],), b, dtype=torch.int32, device=device)
        cache.append(k.to(device), slots, pos, k_scale=s.to(device), block_table=table,
                     req_indices=req, backend=backend)
    return cache, table


def build_sharded_cache(requests: list[tuple[torch.Tensor, torch.Tensor]], layout, rank: int, *,
                        block_size: int, head_dim: int, seed: int, decode_steps: int = 3,
                        group=None, extra_columns: int = 1, device="cpu",
                        backend: str = "torch", prompt_chunk: int | None = None
                        ) -> tuple[PagedIndexerCache, torch.Tensor]:
    """This rank's shard of ``requests`` (global keys per request), written the way a serving
    engine writes it: :func:`hisa.distributed.cache_append` with every rank passing all new
    tokens, first each request's prompt minus its last ``decode_steps`` tokens in one call, then
    one call per decode step covering every request still growing. All ranks must call this
    together (split blocks pool through a collective). ``prompt_chunk`` splits the prompt call
    into calls of at most that many tokens (long contexts)."""
    from ..distributed import cache_append
    g = torch.Generator().manual_seed(seed + 1000 * rank)
    lens = [k.shape[0] for k, _ in requests]
    local = [layout.local_length(rank, L) for L in lens]
    n_pages = [-(-n // PAGE_SIZE) for n in local]
    total = sum(n_pages) + 2
    perm = torch.randperm(total, generator=g).to(torch.int32)
    table = torch.full((len(requests), max(n_pages + [1]) + extra_columns), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(n_pages):
        table[b, :n] = perm[start:start + n]
        start += n
    cache = PagedIndexerCache(total, head_dim=head_dim, block_size=block_size, device=device)
    table = table.to(device)

    def write(items):                   # [(request, global positions)]
        if not items:
            return
        pos = torch.cat([p for _, p in items])
        req = torch.cat([torch.full((p.numel(),), b, dtype=torch.int32) for b, p in items])
        k = torch.cat([requests[b][0][p] for b, p in items]).to(device)
        s = torch.cat([requests[b][1][p] for b, p in items]).to(device)
        pos, req = pos.to(device), req.to(device)
        j = layout.count_before(rank, pos)
        mine = layout.owner(pos) == rank
        page = table[req.long(), (j // PAGE_SIZE).clamp(max=table.shape[1] - 1)].long()
        slots = torch.where(mine, page * PAGE_SIZE + j % PAGE_SIZE, -1)
        cache_append(cache.kv_cache, cache.pooled_cache, k, slots, pos, layout=layout,
                     block_table=table, req_indices=req, k_scale=s, block_size=block_size,
                     group=group, backend=backend)

    prompt = [max(L - decode_steps, 0) for L in lens]
    chunk = prompt_chunk or max(prompt + [1])
    for c0 in range(0, max(prompt + [0]), chunk):
        write([(b, torch.arange(c0, min(n, c0 + chunk))) for b, n in enumerate(prompt)
               if n > c0])
    for step in range(decode_steps):
        write([(b, torch.tensor([prompt[b] + step])) for b, L in enumerate(lens)
               if prompt[b] + step < L])
    return cache, table


def spawn_world(fn: Callable, world_size: int, *args, timeout_s: float = 90.0,
                backend: str = "gloo") -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a process group
    (file store, no port needed; "nccl" also sets each rank's GPU to its rank); returns each
    rank's return value, in rank order.

    A rank that raises has its traceback returned as an ``Exception`` in its slot; the others
    then fail at their next collective (broken connection or ``timeout_s``) and report too.
    """
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        out = os.path.join(tmp, "out")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, store, out, timeout_s,
                                                   backend, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s * 4)
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world_size):
            path = f"{out}.{r}"
            if os.path.exists(path):
                results.append(torch.load(path, weights_only=False))
            else:
                results.append(RuntimeError(f"rank {r} wrote no result (exit code "
                                            f"{procs[r].exitcode})"))
        return results


def _worker(fn, rank, world_size, store, out, timeout_s, backend, args):
    import torch.distributed as dist
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
    except BaseException:                                   # reported to the parent
        result = RuntimeError(f"rank {rank}:\n{traceback.format_exc()}")
        torch.save(result, f"{out}.{rank}")
        os._exit(1)                     # do not wait in a collective the others left
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()
