"""HISA packed prefill end to end in Triton, and the same pipeline split into timed stages.

=============  ==============================================  ============================
stage          kernel                                          output
=============  ==============================================  ============================
pool           ``pool.pool_blocks``                            pooled [NB, D] (+ fp8 scale)
block_select   ``block_scores.block_select`` (scores + top-m)  int32 [T, m] ascending ids
token_scores   ``token_scores.token_scores``                   fp32 [tile, m*B] candidates
select_tokens  ``select.select_tokens`` (top-k + offsets)      int32 [T, k] offsets
=============  ==============================================  ============================

With the super-block level (``super_size`` / ``super_topk``) the block_select stage becomes
``pool_supers``, ``super_select`` and ``block_select`` inside the kept super-blocks
(:mod:`.super_blocks`); the token stage is unchanged. FP8 keys at two levels run the same three
stages by default on windows past 8 m blocks, with super-blocks of one block: FP8 copies of
the fp32 block means pre-select m + m/2 blocks, the fp32 means keep m of them
(:func:`resolve_rescore_margin`).

The token stage runs unfused (scores to a buffer, then a register selection kernel): on an H100
the fused kernel (``token_scores.token_select``) measured 26.7 ms at 64K against 12.4 + 7.8 ms
for the two kernels, because the selection's registers (255 per thread) halve the occupancy of
the MMA loop (benchmarks/prefill_notes.md).

Temporaries: the pooled keys, the [T, m] block ids, a per-program scratch row of the block
stage, and the candidate scores of one query tile, fp32 [tile, m*B] with
tile * m*B * 4 <= :data:`TOKEN_TILE_BYTES`: O(T * m * B) at most, capped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...utils.quant import quantize_fp8
from ...utils.validate import FP8_DTYPE
from ..dsa.prefill import check_kernel_shapes, prepare_operands
from .block_scores import block_select, check_window_blocks, window_blocks
from .pool import check_block_size, pool_blocks
from .reps import rep_dot_precision, rep_dtype
from .select import SELECT_MAX_ROW, select_tokens
from .super_blocks import (candidate_block_select, candidate_row_fits, check_super_kernel_params,
                           pool_supers, super_select, three_level_block_ids)
from .token_scores import token_scores

_KEY_DTYPES = {1: FP8_DTYPE, 2: torch.bfloat16, 4: torch.float32}

#: Cap on the candidate-score buffer of the token stage (bytes): 1 GiB = 32,768 queries at
#: m*B = 8,192.
TOKEN_TILE_BYTES = 1 << 30


def _prepare(q, k, weights, ks, ke, k_scale, block_size):
    check_kernel_shapes(q, k)
    check_block_size(block_size)
    q, k, prec = prepare_operands(q, k)
    k_scale = None if k_scale is None else k_scale.contiguous()
    return q, k, weights.contiguous(), ks.contiguous(), ke.contiguous(), k_scale, prec


def _window_plan(ks, ke, *, block_size, super_size, super_topk, windows=None
                 ) -> tuple[int, int, int, int]:
    """(first block to pool, largest eligible block count, first super-block to pool, largest
    eligible super-block count) of the queries' windows, after every window limit of the path
    (two levels: the block selection row; three: the candidate row and the super-block row).

    With three levels pooling starts at the first super-block's first block, so every block row
    a super-block is pooled from is set (pool_supers reads rows from ``first_super * Bs`` on);
    the super-level counts are 0 with two levels. ``windows``: the caller's
    :class:`~.prefill.WindowPlan` (no read here; the limits are still checked).
    """
    if super_size is None:
        if windows is None:
            first_block, max_blocks = window_blocks(ks, ke, block_size)
        else:
            first_block, max_blocks = windows.first_block, windows.max_blocks
        check_window_blocks(max_blocks, block_size)
        return first_block, max_blocks, 0, 0
    first_super, max_supers = check_super_kernel_params(
        ks, ke, block_size=block_size, super_size=super_size, super_topk=super_topk,
        windows=None if windows is None else (windows.first_super, windows.max_supers))
    return first_super * super_size, 0, first_super, max_supers


#: ``rescore_margin`` of the default: for FP8 keys at two levels (on windows past
#: :data:`RESCORE_MIN_BLOCKS_PER_M` * m blocks), pre-select m + m // 2 blocks on FP8 copies of
#: the reps, then keep the best m by the reps themselves (fp32 by default). On an H200
#: (68ad042, benchmarks/results/round3/pooled_format_h200.jsonl) it selected what the fp32
#: scan selects at every bench shape (IoU against the exact means 0.9992-1.0), faster at all
#: but one: 128K prefill 40.3 vs 44.1 ms, 1M chunk 1.52 vs 1.99 ms, 1M chunk at B = 64, m = 32
#: 2.21 vs 3.54 ms; 64K prefill 20.4 vs 20.2 ms (slower; 16K-64K measured slower again at
#: 2443cf1, hence the edge). FP8 reps alone are faster still but miss 0.995 (0.93-0.99).
AUTO = "auto"

#: The default pre-selects only when the longest window has more than this many times m
#: blocks (512 at the defaults: windows past 64K keys). Its two extra launches and the
#: re-score of m + m/2 candidates cost more than the fp32 scan saves on shorter windows. H200,
#: full causal prefill end to end, same selections (IoU 1.0; 2443cf1,
#: benchmarks/results/round3/token_trip_h200_2443cf1.jsonl), pre-selection vs fp32 scan:
#: 16K 4.64 vs 4.20 ms, 32K 9.43 vs 8.83, 64K 19.30 vs 18.70, 128K 40.24 vs 41.06.
RESCORE_MIN_BLOCKS_PER_M = 8


def resolve_rescore_margin(rescore_margin, *, key_dtype: torch.dtype, reps: torch.dtype,
                           super_size: int | None, block_topk: int, max_blocks: int
                           ) -> int | None:
    """The pre-selection margin to run with (None: score every block on the reps).

    The pre-selection runs as three levels with super-blocks of one block, so it has the
    super-block level's limits (:func:`~.super_blocks.check_super_kernel_params`).
    ``"auto"`` (the default) gives ``block_topk // 2`` for FP8 keys at two levels with fp32 or
    bf16 reps where those limits hold and some window has more than m + m/2 and more than
    :data:`RESCORE_MIN_BLOCKS_PER_M` * m blocks (``max_blocks``, the longest window's), and
    None otherwise (fp32 or bf16 keys have no cheaper
    format to pre-select on). An int must meet the same conditions (ValueError naming
    ``rescore_margin``)."""
    if rescore_margin is None:
        return None
    auto = isinstance(rescore_margin, str) and rescore_margin == AUTO
    if not auto and (isinstance(rescore_margin, bool) or not isinstance(rescore_margin, int)
                     or rescore_margin < 0):
        raise ValueError(f"rescore_margin: expected None, {AUTO!r} or an int >= 0, got "
                         f"{rescore_margin!r}")
    margin = block_topk // 2 if auto else rescore_margin
    applies = super_size is None and key_dtype == FP8_DTYPE and reps != FP8_DTYPE
    # The block row (max_blocks) already passed the two-level check (check_window_blocks).
    fits = candidate_row_fits(1, block_topk + margin)
    if auto:   # a pre-selection that keeps every block of the longest window prunes nothing
        long = (block_topk + margin < max_blocks
                and max_blocks > RESCORE_MIN_BLOCKS_PER_M * block_topk)
        return margin if applies and fits and long else None
    if not applies:
        raise ValueError(f"rescore_margin: expected two levels over FP8 q and k with fp32 or bf16 "
                         f"block reps, got super_size={super_size}, prepared keys {key_dtype}, "
                         f"reps {reps}")
    if not fits:
        raise ValueError(f"rescore_margin: block_topk + rescore_margin = {block_topk + margin} "
                         f"candidates exceed the Triton selection row ({SELECT_MAX_ROW})")
    return margin


@dataclass(frozen=True)
class BlockStage:
    """How the block stage runs for one call: two levels (``super_size`` None: every block
    scored on the reps) or through a super-block level, which is either the caller's three
    levels or the FP8 pre-selection (super-blocks of one block, FP8 copies). ``super_prec``:
    the super-block dots' precision; ``rep_prec``: the dots' against the block reps."""

    super_size: int | None
    super_topk: int | None
    first_super: int
    max_supers: int
    super_dtype: torch.dtype | None
    super_prec: str
    rep_prec: str


def plan_block_stage(key_dtype: torch.dtype, prec: str, *, reps_dtype, rescore_margin,
                     reps_prec, block_topk: int, super_size, super_topk, first_block: int,
                     max_blocks: int, first_super: int, max_supers: int) -> BlockStage:
    """The :class:`BlockStage` of a call (shared by :func:`hisa_index_triton` and
    :func:`hisa_prefill_stages`, so the two run the same stages)."""
    reps = rep_dtype(key_dtype, reps_dtype)
    rep_prec = rep_dot_precision(reps, prec, reps_prec)
    margin = resolve_rescore_margin(rescore_margin, key_dtype=key_dtype, reps=reps,
                                    super_size=super_size, block_topk=block_topk,
                                    max_blocks=max_blocks)
    if margin is not None:     # the pre-selection: super-blocks of one block, FP8 copies
        return BlockStage(1, block_topk + margin, first_block, max_blocks, FP8_DTYPE, prec,
                          rep_prec)
    return BlockStage(super_size, super_topk, first_super, max_supers, None, rep_prec, rep_prec)


def given_pooled(pooled: torch.Tensor, k: torch.Tensor, reps_dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caller-supplied representatives stored as the pooling stage would store them for the
    prepared ``k`` (:func:`~.reps.rep_dtype`): FP8 with one scale per block (the recipe of
    :mod:`hisa.utils.quant`) or a plain float dtype."""
    dtype = rep_dtype(k.dtype, reps_dtype)
    if dtype == FP8_DTYPE:
        return quantize_fp8(pooled.float(), group_size=pooled.shape[1])
    return pooled.to(dtype).contiguous(), None


def _token_stage(q, k, weights, ks, ke, ids, k_scale, prec, *, block_size, topk, idx, vals,
                 buf):
    """Candidate scores then selection, one query tile at a time (buf: fp32 [tile * m*B])."""
    T = q.shape[0]
    mb = ids.shape[1] * block_size
    tile = max(1, buf.numel() // max(mb, 1))
    if tile >= T:               # one tile: the whole tensors, no per-call views
        sc = token_scores(q, k, weights, ks, ke, ids, block_size=block_size, k_scale=k_scale,
                          prec=prec, out=buf)
        select_tokens(sc, ids, ks, block_size=block_size, topk=topk, out=idx,
                      need_scores=vals is not None, out_scores=vals)
        return
    for t0 in range(0, T, tile):
        sl = slice(t0, min(T, t0 + tile))
        sc = token_scores(q[sl], k, weights[sl], ks[sl], ke[sl], ids[sl], block_size=block_size,
                          k_scale=k_scale, prec=prec, out=buf)
        select_tokens(sc, ids[sl], ks[sl], block_size=block_size, topk=topk, out=idx[sl],
                      need_scores=vals is not None,
                      out_scores=None if vals is None else vals[sl])


def _token_buffer(T, mb, device):
    rows = max(1, min(T, TOKEN_TILE_BYTES // (4 * max(mb, 1))))
    return torch.empty(rows * mb, dtype=torch.float32, device=device)


def prefill_workspace_bytes(num_queries: int, num_keys: int, *, head_dim: int, key_bytes: int,
                            block_size: int, block_topk: int, programs: int,
                            super_size: int | None = None, super_topk: int | None = None,
                            windows: tuple[torch.Tensor, torch.Tensor] | None = None,
                            rep_bytes: int | None = None,
                            rescore_margin: int | str | None = AUTO) -> dict[str, int]:
    """Bytes of every temporary :func:`hisa_index_triton` allocates (outputs excluded).

    ``rescore_margin`` as there: with a pre-selection (the default for FP8 keys at two levels
    past 8 m blocks)
    the block stage is modelled as the three-level one with super-blocks of one block and FP8
    super reps.

    ``key_bytes``: 1 for FP8 keys, 2 for bf16, 4 for fp32; ``rep_bytes``: bytes per value of
    the representatives, by default those :func:`~.reps.rep_dtype` gives (fp32; 1 means FP8
    reps, which carry a 4-byte scale). ``programs``: the persistent grid of the selection stages
    (``persistent_programs(T, device, 4)``: 4 per SM, at most T). ``windows``: the queries'
    (ks, ke), whose longest window sizes the selection scratch rows; by default one window of
    all ``num_keys`` keys (a chunk's last query, or a causal prefill's). Nothing here grows as
    T * S: the largest entry is the token stage's candidate buffer, capped at
    :data:`TOKEN_TILE_BYTES`; the block and super-block scratch rows are per program.
    """
    T, S, D, B, m = num_queries, num_keys, head_dim, block_size, block_topk
    if key_bytes not in _KEY_DTYPES:
        raise ValueError(f"key_bytes: expected 1 (FP8), 2 (bf16) or 4 (fp32), got {key_bytes}")
    if rep_bytes is None:
        rep_bytes = rep_dtype(_KEY_DTYPES[key_bytes]).itemsize
    nb = -(-S // B)
    grid = max(1, min(T, programs))

    def longest(span):
        return window_blocks(*windows, span)[1] if windows is not None else -(-S // span)

    def reps(name, rows, value_bytes):      # FP8 rows carry one fp32 scale each, own tensor
        return {name: rows * D * value_bytes, **({f"{name}_scale": 4 * rows}
                                                 if value_bytes == 1 else {})}

    ws = {**reps("pooled", nb, rep_bytes), "block_ids": 4 * T * m,
          "token_scores": 4 * B * m * max(1, min(T, TOKEN_TILE_BYTES // (4 * B * m)))}
    margin = resolve_rescore_margin(rescore_margin, key_dtype=_KEY_DTYPES[key_bytes],
                                    reps=FP8_DTYPE if rep_bytes == 1 else torch.float32,
                                    super_size=super_size, block_topk=m,
                                    max_blocks=longest(B))
    super_bytes = rep_bytes
    if margin is not None:                  # super-blocks of one block, FP8 copies
        super_size, super_topk, super_bytes = 1, m + margin, 1
    if super_size is None:
        ws["block_scratch"] = 4 * grid * max(longest(B), 1)
    else:
        ns = -(-nb // super_size)
        ws.update(reps("super_pooled", ns, super_bytes), super_ids=4 * T * super_topk,
                  super_scratch=4 * grid * max(longest(B * super_size), 1),
                  candidate_scratch=4 * grid * super_topk * super_size)
    return ws


def hisa_prefill_stages(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                        ks: torch.Tensor, ke: torch.Tensor, *, k_scale: torch.Tensor | None,
                        topk: int, block_size: int, block_topk: int,
                        super_size: int | None = None, super_topk: int | None = None,
                        reps_dtype: torch.dtype | None = None,
                        rescore_margin: int | str | None = AUTO, reps_prec: str | None = None
                        ) -> list[tuple[str, Callable[[], object]]]:
    """The pipeline as [(stage name, zero-argument callable)], run in order.

    With a re-score margin (the default for FP8 keys at two levels past 8 m blocks, see
    :func:`hisa_index_triton`) the block stage is ``pool_supers`` (FP8 copies of the block
    reps), ``super_select`` (the FP8 pre-selection of m + margin blocks) and ``block_select``
    (the best m of those on the reps), as the three-level path with super-blocks of one block.

    Each callable runs one stage on the intermediates of the previous ones (kept in the
    closure), so a benchmark can time the stages one by one; running them all in order gives
    the result of :func:`hisa_index_triton` in ``state["idx"]`` of the last callable's return.

    Example:
        >>> for name, fn in hisa_prefill_stages(q, k, w, ks, ke, k_scale=ksc, topk=2048,
        ...                                     block_size=128, block_topk=64):
        ...     fn()
    """
    q, k, weights, ks, ke, k_scale, prec = _prepare(q, k, weights, ks, ke, k_scale, block_size)
    first_block, max_blocks, first_super, max_supers = _window_plan(
        ks, ke, block_size=block_size, super_size=super_size, super_topk=super_topk)
    stage = plan_block_stage(k.dtype, prec, reps_dtype=reps_dtype,
                             rescore_margin=rescore_margin, reps_prec=reps_prec,
                             block_topk=block_topk, super_size=super_size, super_topk=super_topk,
                             first_block=first_block, max_blocks=max_blocks,
                             first_super=first_super, max_supers=max_supers)
    super_size, super_topk = stage.super_size, stage.super_topk
    T = q.shape[0]
    state: dict = {
        "ids": torch.empty(T, block_topk, dtype=torch.int32, device=q.device),
        "idx": torch.empty(T, topk, dtype=torch.int32, device=q.device),
    }

    def pool():
        state["pooled"], state["pooled_scale"] = pool_blocks(
            k, k_scale, block_size=block_size, first_block=first_block,
            out_dtype=rep_dtype(k.dtype, reps_dtype))
        return state

    def blocks():
        block_select(q, state["pooled"], weights, ks, ke, block_size=block_size,
                     block_topk=block_topk, pooled_scale=state["pooled_scale"],
                     prec=stage.rep_prec, out=state["ids"], max_blocks=max_blocks)
        return state

    def supers_pool():
        state["super"], state["super_scale"] = pool_supers(
            state["pooled"], state["pooled_scale"], k.shape[0], block_size=block_size,
            super_size=super_size, first_super=stage.first_super, out_dtype=stage.super_dtype)
        return state

    def supers_select():
        state["super_ids"] = super_select(q, state["super"], weights, ks, ke,
                                          block_size=block_size, super_size=super_size,
                                          super_topk=super_topk,
                                          super_scale=state["super_scale"],
                                          prec=stage.super_prec, max_supers=stage.max_supers)
        return state

    def blocks_in_supers():
        candidate_block_select(q, state["pooled"], weights, ks, ke, state["super_ids"],
                               block_size=block_size, super_size=super_size,
                               block_topk=block_topk, pooled_scale=state["pooled_scale"],
                               prec=stage.rep_prec, out=state["ids"])
        return state

    if super_size is None:
        selection = [("pool", pool), ("block_select", blocks)]
    else:
        selection = [("pool", pool), ("pool_supers", supers_pool),
                     ("super_select", supers_select), ("block_select", blocks_in_supers)]

    state["buf"] = _token_buffer(T, block_topk * block_size, q.device)

    def scores():
        # Timed alone only when one tile holds every query (the benchmark's shapes up to 128K
        # fit in two); the select stage then reads what this stage wrote.
        mb = block_topk * block_size
        tile = state["buf"].numel() // mb
        state["scores"] = token_scores(q[:tile], k, weights[:tile], ks[:tile], ke[:tile],
                                       state["ids"][:tile], block_size=block_size,
                                       k_scale=k_scale, prec=prec, out=state["buf"])
        return state

    def select():
        _token_stage(q, k, weights, ks, ke, state["ids"], k_scale, prec, block_size=block_size,
                     topk=topk, idx=state["idx"], vals=None, buf=state["buf"])
        return state

    def tokens_select_only():
        tile = state["scores"].shape[0]
        select_tokens(state["scores"], state["ids"][:tile], ks[:tile], block_size=block_size,
                      topk=topk, out=state["idx"][:tile])
        return state

    if state["buf"].numel() // (block_topk * block_size) >= T:
        return selection + [("token_scores", scores), ("select_tokens", tokens_select_only)]
    return selection + [("token_stage", select)]


def hisa_index_triton(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                      ke: torch.Tensor, *, k_scale: torch.Tensor | None, topk: int,
                      block_size: int, block_topk: int, out: torch.Tensor | None = None,
                      need_scores: bool = False, super_size: int | None = None,
                      super_topk: int | None = None, pooled: torch.Tensor | None = None,
                      windows=None, reps_dtype: torch.dtype | None = None,
                      rescore_margin: int | str | None = AUTO, reps_prec: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HISA selection with Triton kernels (inputs validated by :func:`hisa.hisa_index`); two
    levels, or three with ``super_size`` / ``super_topk``; ``pooled`` replaces the pooling
    stage with the caller's representatives. ``windows``: the
    :class:`~hisa.ops.indexer.prefill.WindowPlan` the public op read with its window check
    (by default the windows are read here, one host sync). ``reps_dtype``: how the block
    representatives are stored (:func:`~.reps.rep_dtype`: fp32 by default; bf16 or
    float8_e4m3fn for the formats benchmarks/pooled_format_cost.py times beside it).
    ``rescore_margin`` (two levels, FP8 keys): pre-select the top ``block_topk +
    rescore_margin`` blocks on FP8 re-quantized reps (FP8 MMAs, the cheap full scan), then keep
    the best ``block_topk`` of those by the stored reps (fp32 by default, bf16 with
    ``reps_dtype``); run as three levels with super-blocks of one block. It equals the
    full scan's selection whenever the true top m lie in FP8's top m +
    margin (benchmarks/pooled_precision_probe.py measures how often). ``"auto"`` (default):
    ``block_topk // 2`` where it applies (:func:`resolve_rescore_margin`); None scores every
    block on the reps. ``reps_prec``: the dot precision against fp32 reps
    (:func:`~.reps.rep_dot_precision`; tf32 by default), for
    ``benchmarks/pooled_format_cost.py --precision``.

    Returns:
        (int32 [T, topk] offsets relative to ks, -1 padded — ``out`` itself when given;
         fp32 [T, topk] aligned scores, -inf padded, or None unless ``need_scores``).
    """
    q, k, weights, ks, ke, k_scale, prec = _prepare(q, k, weights, ks, ke, k_scale, block_size)
    # Every check that can fail runs before the first launch (one host sync for the windows,
    # none when the caller read them).
    first_block, max_blocks, first_super, max_supers = _window_plan(
        ks, ke, block_size=block_size, super_size=super_size, super_topk=super_topk,
        windows=windows)
    stage = plan_block_stage(k.dtype, prec, reps_dtype=reps_dtype,
                             rescore_margin=rescore_margin, reps_prec=reps_prec,
                             block_topk=block_topk, super_size=super_size, super_topk=super_topk,
                             first_block=first_block, max_blocks=max_blocks,
                             first_super=first_super, max_supers=max_supers)
    if pooled is None:
        pooled, pooled_scale = pool_blocks(k, k_scale, block_size=block_size,
                                           first_block=first_block,
                                           out_dtype=rep_dtype(k.dtype, reps_dtype))
    else:
        pooled, pooled_scale = given_pooled(pooled, k, reps_dtype)
    if stage.super_size is None:
        ids = block_select(q, pooled, weights, ks, ke, block_size=block_size,
                           block_topk=block_topk, pooled_scale=pooled_scale,
                           prec=stage.rep_prec, max_blocks=max_blocks)
    else:
        ids = three_level_block_ids(q, k, weights, ks, ke, pooled, pooled_scale,
                                    block_size=block_size, block_topk=block_topk,
                                    super_size=stage.super_size, super_topk=stage.super_topk,
                                    prec=stage.super_prec, first_super=stage.first_super,
                                    max_supers=stage.max_supers, super_dtype=stage.super_dtype,
                                    candidate_prec=stage.rep_prec)
    T = q.shape[0]
    idx = out if out is not None else torch.empty(T, topk, dtype=torch.int32, device=q.device)
    vals = torch.empty(T, topk, dtype=torch.float32, device=q.device) if need_scores else None
    if T:
        _token_stage(q, k, weights, ks, ke, ids, k_scale, prec, block_size=block_size,
                     topk=topk, idx=idx, vals=vals,
                     buf=_token_buffer(T, block_topk * block_size, q.device))
    return idx, vals
