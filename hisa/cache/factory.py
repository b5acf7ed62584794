"""Random paged decode inputs, shared by the paged tests and the decode benchmarks.

Pages are handed out in a shuffled order (so physical order never matches logical order), keys
are written through :meth:`PagedIndexerCache.append` with real slot mappings, positions and block
tables, and the packed per-request keys are kept for comparisons with the packed references.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..testing.inputs import EXACT_MAX, exact_weights
from ..utils.quant import quantize_fp8
from .layout import PAGE_SIZE
from .paged import PagedIndexerCache


@dataclass
class PagedInputs:
    """q [batch, next_n, H, D], weights [batch * next_n, H], seq_lens, block_table, the cache,
    and each request's keys as (fp8 [L, D], fp32 [L])."""

    q: torch.Tensor
    weights: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    cache: PagedIndexerCache
    keys: list = field(default_factory=list)

    @property
    def next_n(self) -> int:
        return self.q.shape[1]

    def args(self) -> tuple:
        """(q, kv_cache, weights, seq_lens, block_table) for :func:`hisa.dsa_index_paged`."""
        return self.q, self.cache.kv_cache, self.weights, self.seq_lens, self.block_table

    def hisa_args(self) -> tuple:
        """(q, kv_cache, pooled_cache, weights, seq_lens, block_table)."""
        return (self.q, self.cache.kv_cache, self.cache.pooled_cache, self.weights,
                self.seq_lens, self.block_table)

    def super_kwargs(self, super_topk: int) -> dict:
        """The super-block keywords of :func:`hisa.hisa_index_paged` for this cache."""
        return {"super_cache": self.cache.super_cache, "super_size": self.cache.super_size,
                "super_topk": super_topk}

    def row_lengths(self) -> torch.Tensor:
        """Visible keys of each query row, int64 [batch * next_n]."""
        from ..ops.dsa.paged import paged_row_lengths
        return paged_row_lengths(self.seq_lens, self.next_n).flatten()


def random_keys(length: int, head_dim: int, *, generator: torch.Generator, device,
                clustered: bool = True) -> torch.Tensor:
    """fp32 [length, D] keys; ``clustered`` adds a drift every 256 tokens so blocks differ."""
    k = torch.randn(length, head_dim, generator=generator, device=device)
    if clustered and length:
        drift = torch.randn(length // 256 + 1, head_dim, generator=generator, device=device)
        k += 2.0 * drift.repeat_interleave(256, dim=0)[:length]
    return k


def make_paged_inputs(seq_lens: list[int], *, next_n: int = 1, heads: int = 8,
                      head_dim: int = 128, block_size: int = 128, super_size: int | None = None,
                      q_dtype: torch.dtype = torch.float8_e4m3fn, seq_lens_2d: bool = False,
                      extra_pages: int = 3, extra_columns: int = 1, seed: int = 0,
                      device: str | torch.device = "cpu", backend: str = "torch",
                      clustered: bool = True, keep_keys: bool = True,
                      exact: bool = False) -> PagedInputs:
    """Fill a fresh cache with ``seq_lens[b]`` random keys per request and draw queries.

    Unused block-table columns hold -1 so that a kernel reading them would fail loudly.
    ``super_size`` gives the cache a super-block level (maintained by the same appends).
    ``exact``: integer keys quantized with power-of-two (ue8m0) scales, integer fp32 (or fp8)
    queries and power-of-two weights, so every token score is exact in fp32 whatever the
    summation order (see :func:`hisa.testing.inputs.make_exact_indexer_inputs`).
    """
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    batch = len(seq_lens)
    n_pages = [-(-L // PAGE_SIZE) for L in seq_lens]
    num_pages = sum(n_pages) + extra_pages
    perm = torch.randperm(num_pages, generator=g, device=dev).to(torch.int32)
    max_pages = max(n_pages + [1]) + extra_columns
    block_table = torch.full((batch, max_pages), -1, dtype=torch.int32, device=dev)
    cache = PagedIndexerCache(num_pages, head_dim=head_dim, block_size=block_size,
                              super_size=super_size, device=dev)
    keys, start = [], 0
    for b, (L, n) in enumerate(zip(seq_lens, n_pages)):
        block_table[b, :n] = perm[start:start + n]
        start += n
        if L == 0:
            keys.append((torch.empty(0, head_dim, device=dev).to(torch.float8_e4m3fn),
                         torch.empty(0, device=dev)))
            continue
        if exact:
            kf = torch.randint(-EXACT_MAX, EXACT_MAX + 1, (L, head_dim), generator=g,
                               device=dev, dtype=torch.int8).float()
        else:
            kf = random_keys(L, head_dim, generator=g, device=dev, clustered=clustered)
        k, k_scale = quantize_fp8(kf, group_size=head_dim, ue8m0=exact)
        pos = torch.arange(L, device=dev)
        slots = block_table[b, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
        req = torch.full((L,), b, dtype=torch.int32, device=dev)
        cache.append(k, slots, pos, k_scale=k_scale, block_table=block_table, req_indices=req,
                     backend=backend)
        if keep_keys:
            keys.append((k, k_scale))
    qf = torch.randn(batch, next_n, heads, head_dim, generator=g, device=dev)
    w = torch.randn(batch * next_n, heads, generator=g, device=dev) * heads ** -0.5
    if exact:
        qf = torch.randint(-EXACT_MAX, EXACT_MAX + 1, qf.shape, generator=g, device=dev).float()
        w = exact_weights(batch * next_n, heads, generator=g, device=dev)
        q = qf.to(q_dtype)
    elif q_dtype == torch.float8_e4m3fn:
        q, q_scale = quantize_fp8(qf, group_size=head_dim)          # q_scale [batch, next_n, H]
        w = w * q_scale.reshape(batch * next_n, heads)
    else:
        q = qf.to(q_dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
    if seq_lens_2d:
        lens = (lens.unsqueeze(1) - next_n + 1 + torch.arange(next_n, device=dev)).clamp_min(0)
        lens = lens.to(torch.int32)
    return PagedInputs(q, w.float().contiguous(), lens, block_table, cache, keys)


def build_super_cache(inp: PagedInputs, super_size: int, *, backend: str = "torch"
                      ) -> torch.Tensor:
    """A super-block cache of ``super_size`` for the keys already in ``inp.cache``, pooled from
    its block rows exactly as appends would have (for comparing several super sizes on one
    cache). Returns uint8 [num_pages, D + 4]."""
    from .layout import mark_pooled_unknown
    from .paged import _naive_pool_super_rows, check_super_size
    check_super_size(super_size)
    cache = inp.cache
    dev = cache.device
    span = cache.block_size * super_size
    sup = mark_pooled_unknown(torch.empty_like(cache.pooled_cache))   # as a new cache holds
    lens = inp.seq_lens if inp.seq_lens.dim() == 1 else inp.seq_lens[:, -1]
    pos, req = [], []
    for b, L in enumerate(lens.tolist()):
        p = torch.arange(span - 1, max(L, span - 1), span, device=dev)   # completing tokens
        pos.append(p)
        req.append(torch.full_like(p, b))
    pos, req = torch.cat(pos), torch.cat(req)
    slots = inp.block_table[req, pos // PAGE_SIZE].long() * PAGE_SIZE + pos % PAGE_SIZE
    if backend == "torch":
        _naive_pool_super_rows(cache.pooled_cache, sup, slots // PAGE_SIZE, pos, slots >= 0,
                               inp.block_table, req, block_size=cache.block_size,
                               super_size=super_size)
    else:
        from .append_super import pool_super_rows
        # one completing token per super-block, each on its own slot: every valid one wins
        written = ((slots >= 0) & (slots < cache.num_pages * PAGE_SIZE)).to(torch.int8)
        pool_super_rows(cache.pooled_cache, sup, slots, pos, inp.block_table, req,
                        num_pages=cache.num_pages, block_size=cache.block_size,
                        super_size=super_size, written=written)
    return sup
