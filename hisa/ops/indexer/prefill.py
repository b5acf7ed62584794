"""Public HISA indexer for packed prefill: block-then-token selection."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ...utils.backend import resolve_backend, runs_on_device_of, triton_installed
from ...utils.output import check_out_buffer, finish_output
from ...utils.validate import (check_hisa_params, check_indexer_inputs, check_positive_int,
                               check_same_device, check_shape, check_super_params,
                               check_tensor, check_windows, raise_bad_windows)
from ..dsa.naive import naive_dsa_index
from .naive import eligible_blocks, naive_hisa_index
from .naive_super import eligible_supers, naive_hisa_index_super


def keep_short_windows(idx: torch.Tensor, scores: torch.Tensor | None, q: torch.Tensor,
                       k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
                       ke: torch.Tensor, *, k_scale: torch.Tensor | None, topk: int,
                       block_size: int, block_topk: int, super_size: int | None = None,
                       super_topk: int | None = None) -> None:
    """Rows whose window holds <= topk keys return all of them (contract section 2).

    With m * B >= k a window of at most k keys spans at most m + 1 blocks; when it spans
    exactly m + 1 (unaligned, and m * B close to k) the block stage would drop one block.
    Likewise, with the super-block level (ms * Bs * B >= m * B >= k) such a window spans at
    most ms + 1 super-blocks, and at ms + 1 the super stage would drop one. Those rare rows are
    recomputed by the flat path, which keeps every key.
    """
    first, end = eligible_blocks(ks, ke, block_size)
    pruned = (end - first) > block_topk
    if super_size is not None:
        first_s, end_s = eligible_supers(ks, ke, block_size, super_size)
        pruned |= (end_s - first_s) > super_topk
    rows = (((ke - ks) <= topk) & pruned).nonzero().squeeze(1)
    if rows.numel() == 0:
        return
    sub_idx, sub_scores = naive_dsa_index(q[rows], k, weights[rows], ks[rows], ke[rows],
                                          k_scale=k_scale, topk=topk)
    idx[rows] = sub_idx
    if scores is not None:
        scores[rows] = sub_scores


def _blocks_spanned(ks: torch.Tensor, ke: torch.Tensor, span: int) -> torch.Tensor:
    """int32 [T]: blocks of ``span`` keys in each window, 0 for an empty one (the count of
    :func:`.naive.eligible_blocks`; int32 stays exact since 0 <= ks <= ke < 2**31)."""
    spanned = (ke - 1).div(span, rounding_mode="floor") - ks.div(span, rounding_mode="floor") + 1
    return spanned.masked_fill_(ke <= ks, 0)


@dataclass(frozen=True)
class WindowPlan:
    """Every fact of one call's windows the host needs, read with the window check.

    ``first_block`` / ``max_blocks``: smallest first eligible block and largest eligible block
    count over the queries (:func:`.block_scores.window_blocks`); ``first_super`` /
    ``max_supers`` the same for super-blocks (0 with two levels). ``nothing_pruned``: every
    query keeps all its eligible blocks and super-blocks, so its HISA set is the flat
    indexer's (contract section 2), which the flat kernels compute with less work.
    ``short_pruned``: some window of at most ``topk`` keys would lose a block or super-block,
    so :func:`keep_short_windows` has rows to repair. ``span``: (min(ks), max(ke)).
    """

    first_block: int
    max_blocks: int
    first_super: int
    max_supers: int
    nothing_pruned: bool
    short_pruned: bool
    span: tuple[int, int]
    #: What the facts were read from (see :func:`check_plan`): the ``ks`` / ``ke`` tensors,
    #: their in-place write counters, ``num_keys`` and the selection parameters.
    made_for: tuple | None = field(default=None, compare=False, repr=False)
    #: The plan's own copies of ``(ks, ke)``, taken before the read: a call given the plan
    #: computes on them (:func:`plan_windows`).
    windows: tuple | None = field(default=None, compare=False, repr=False)
    #: The flat route's logits tiles ``(t0, rows, lo, W)`` when they needed the windows read
    #: (more than one tile): read with the plan, so a call given it reads nothing.
    flat_tiles: tuple | None = field(default=None, compare=False, repr=False)


def _write_counter(t: torch.Tensor) -> int | None:
    """``t``'s in-place write counter (views share their base's), or None for an inference
    tensor, which keeps none (an engine's forward runs under ``torch.inference_mode``)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _plan_key(ks: torch.Tensor, ke: torch.Tensor, num_keys: int, params: dict) -> tuple:
    return (_write_counter(ks), _write_counter(ke), num_keys, tuple(sorted(params.items())))


def check_plan(plan: "WindowPlan", ks: torch.Tensor, ke: torch.Tensor, num_keys: int,
               **params) -> None:
    """A caller's ``plan`` must have been read by :func:`plan_windows` from these very ``ks`` /
    ``ke`` tensors (identity, not equal values: comparing values would read them, the host
    sync the plan exists to avoid), unwritten since by torch ops, with the same ``num_keys``
    and selection parameters: the kernels size their grids and workspaces from it, so a plan
    of other windows would drop blocks or index past a buffer. In-place writes are seen through
    the tensors' write counters, which inference tensors (made under ``torch.inference_mode``,
    as an engine's forward runs) do not keep: a write to those goes unseen, as does one by
    another kernel through a raw pointer. A plan is for windows the caller does not change.
    """
    if not isinstance(plan, WindowPlan) or plan.made_for is None:
        raise TypeError(f"plan: expected the WindowPlan plan_windows returns, got "
                        f"{type(plan).__name__}")
    plan_ks, plan_ke, key = plan.made_for
    if plan_ks is not ks or plan_ke is not ke:
        raise ValueError("plan: it was read from other ks/ke tensors; a plan holds only for "
                         "the tensors plan_windows read (pass those, or no plan)")
    now = _plan_key(ks, ke, num_keys, params)
    if now[:2] != key[:2]:
        raise ValueError("plan: ks or ke were written in place after plan_windows read them")
    if now[2:] != key[2:]:
        raise ValueError(f"plan: read for num_keys={key[2]} and {dict(key[3])}, used with "
                         f"num_keys={num_keys} and {dict(now[3])}")


@runs_on_device_of("ks")
def plan_windows(ks: torch.Tensor, ke: torch.Tensor, num_keys: int, *, topk: int,
                 block_size: int, block_topk: int, super_size: int | None = None,
                 super_topk: int | None = None, fused: bool | None = None) -> WindowPlan:
    """Every window fact a :func:`hisa_index` call over these windows reads on the host, in
    one read (validation included, as the call does it), for ``hisa_index(..., plan=)``: a
    caller running many calls over the same windows (the layers of one engine step) pays the
    host sync once.

    The plan keeps its own copies of ``ks`` / ``ke`` (two small device copies, no sync),
    reads its facts from them, and a call given the plan computes on them. The kernels size
    grids and workspaces from the facts, so windows changed after planning in a way the checks
    of :func:`check_plan` cannot see (an inference tensor written in place, a raw-pointer
    write) cannot make them index past a buffer: the call selects for the windows as planned.

    On the flat route (nothing pruned) with more than one logits tile of queries, the tiles
    are read too (a second sync, here instead of in every call). ``fused``: as in
    :func:`read_window_plan`. The windows and each parameter are checked as
    :func:`hisa_index` checks them; the rule ``block_topk * block_size >= topk`` is left to
    the call the plan serves (the facts are defined without it, and a call refuses such
    parameters before it reads a plan).
    """
    check_tensor("ks", ks, dtypes=(torch.int32,), ndim=1)
    check_tensor("ke", ke, dtypes=(torch.int32,), ndim=1)
    check_shape("ke", ke, tuple(ks.shape))
    check_same_device(ks=ks, ke=ke)
    num_keys = check_positive_int("num_keys", num_keys, minimum=0)
    topk = check_positive_int("topk", topk)
    block_size = check_positive_int("block_size", block_size)
    block_topk = check_positive_int("block_topk", block_topk, minimum=2)
    sup = check_super_params(block_topk=block_topk, super_size=super_size,
                             super_topk=super_topk)
    made_for = (ks, ke, _plan_key(ks, ke, num_keys, dict(
        topk=topk, block_size=block_size, block_topk=block_topk,
        super_size=sup.get("super_size"), super_topk=sup.get("super_topk"))))
    own = (ks.clone(), ke.clone())
    plan = read_window_plan(*own, num_keys, topk=topk, block_size=block_size,
                            block_topk=block_topk, fused=fused, flat_tiles=True, **sup)
    return replace(plan, made_for=made_for, windows=own)


def read_window_plan(ks: torch.Tensor, ke: torch.Tensor, num_keys: int, *, topk: int,
                     block_size: int, block_topk: int, super_size: int | None = None,
                     super_topk: int | None = None, fused: bool | None = None,
                     flat_tiles: bool | None = None) -> WindowPlan:
    """:func:`check_windows` (same errors, same order) and the call's :class:`WindowPlan`, in
    one host transfer: the window statistics every later step reads (the kernels' limits, the
    exact-regime route, the pipeline's pooling start and selection rows, the short-window
    repair) come from here instead of each step reading the windows again. Arguments as
    :func:`hisa_index` validated them (the op's own read; :func:`plan_windows` is the public
    one).

    ``fused``: compute the facts in one Triton launch (:mod:`hisa.ops.window_stats`) instead
    of about twenty torch kernels; None picks it for CUDA windows when Triton is installed
    (``hisa_index(backend="torch")`` passes False: that backend must not need Triton).
    ``flat_tiles``: on the flat route, read the logits tiles too when one tile cannot hold
    every query (a second read, which the flat kernels would otherwise make); None does it
    for CUDA windows, False never.
    """
    if ks.numel() == 0:
        check_windows(ks, ke, num_keys)
        return WindowPlan(0, 0, 0, 0, nothing_pruned=True, short_pruned=False, span=(0, 0))
    if fused is None:
        fused = ks.device.type == "cuda" and triton_installed()
    if fused:
        from ..window_stats import window_stats
        any_bad, lo, hi, max_blocks, max_supers, short = window_stats(
            ks, ke, topk=topk, block_size=block_size, block_topk=block_topk,
            super_span=block_size * super_size if super_size is not None else None,
            super_topk=super_topk)
        raise_bad_windows(ks, ke, num_keys, any_bad=any_bad, lo=lo, hi=hi)
    else:
        blocks = _blocks_spanned(ks, ke, block_size)                               # [T]
        pruned = blocks > block_topk
        extra = [blocks.max()]
        if super_size is not None:
            supers = _blocks_spanned(ks, ke, block_size * super_size)              # [T]
            pruned |= supers > super_topk
            extra.append(supers.max())
        extra.append((pruned & ((ke - ks) <= topk)).any())
        lo, hi, max_blocks, *rest = check_windows(ks, ke, num_keys, extra)
        max_supers, short = (rest[0] if super_size is not None else 0), bool(rest[-1])
    if super_size is None:
        max_supers = 0
    nothing = max_blocks <= block_topk and (super_size is None or max_supers <= super_topk)
    tiles = None
    if nothing and (ks.device.type == "cuda" if flat_tiles is None else flat_tiles):
        from ..dsa.prefill import FLAT_LOGITS_BYTES, query_tiles, tiles_need_windows
        if tiles_need_windows(ks.shape[0], (lo, hi), FLAT_LOGITS_BYTES):
            tiles = tuple(query_tiles(ks, ke, FLAT_LOGITS_BYTES, (lo, hi)))
    return WindowPlan(first_block=lo // block_size, max_blocks=max_blocks,
                      first_super=lo // (block_size * super_size) if super_size else 0,
                      max_supers=max_supers, nothing_pruned=nothing,
                      short_pruned=short, span=(lo, hi), flat_tiles=tiles)


#: dtypes a caller may hand in as precomputed block representatives (``pooled=``).
POOLED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_pooled(pooled: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    """``pooled`` must hold one [D] representative per block of ``k``: [ceil(S / B), D]."""
    check_tensor("pooled", pooled, dtypes=POOLED_DTYPES, ndim=2)
    S, D = k.shape
    check_shape("pooled", pooled, (-(-S // block_size), D))
    check_same_device(k=k, pooled=pooled)


def _kernel_check(q: torch.Tensor, k: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor,
                  block_size: int, block_topk: int, super_size: int | None = None,
                  super_topk: int | None = None, plan: WindowPlan | None = None) -> None:
    """Every limit of the Triton pipeline (``backend="auto"`` falls back to the reference when
    one is exceeded); it reads the windows (a host sync, as :func:`check_windows` does) unless
    ``plan`` carries what it needs."""
    from ..dsa.prefill import check_kernel_shapes
    from .block_scores import check_window_blocks, window_blocks
    from .pool import check_block_size
    from .select import SELECT_MAX_ROW
    check_kernel_shapes(q, k)
    check_block_size(block_size)
    if block_size * block_topk > SELECT_MAX_ROW:
        raise ValueError(f"block_topk * block_size: expected at most {SELECT_MAX_ROW} candidates "
                         f"for the Triton token selection, got {block_size * block_topk}")
    if super_size is None:
        max_blocks = window_blocks(ks, ke, block_size)[1] if plan is None else plan.max_blocks
        check_window_blocks(max_blocks, block_size)
    else:           # no per-window block limit: the block stage scores ms * Bs candidates
        from .super_blocks import check_super_kernel_params
        check_super_kernel_params(ks, ke, block_size=block_size, super_size=super_size,
                                  super_topk=super_topk,
                                  windows=None if plan is None else (plan.first_super,
                                                                     plan.max_supers))


@runs_on_device_of("q")
def hisa_index(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, ks: torch.Tensor,
               ke: torch.Tensor, *, k_scale: torch.Tensor | None = None, topk: int = 2048,
               block_size: int = 128, block_topk: int = 64, super_size: int | None = None,
               super_topk: int | None = None, return_scores: bool = False,
               out: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
               plan: WindowPlan | None = None, backend: str = "auto"):
    """HISA selection: score mean-pooled key blocks, keep the best ``block_topk`` (the first
    and last eligible block always among them), then keep the top ``topk`` tokens of those
    blocks by the exact DSA score. With ``super_size`` / ``super_topk`` a level above blocks
    first keeps the best ``super_topk`` super-blocks of ``super_size`` blocks (the first and
    the query's own always among them), and the block stage runs only inside them.

    Same inputs and output format as :func:`hisa.dsa_index`; when a query has at most
    ``block_topk`` eligible blocks the selection equals the flat indexer's, and when it has at
    most ``super_topk`` eligible super-blocks the three-level selection equals the two-level
    one. On the Triton backend a call in which no query prunes anything runs the flat
    indexer's kernels (the same set, less work); the HISA pipeline runs when some query
    prunes.

    Args:
        q, k, weights, ks, ke, k_scale, topk, return_scores, out, backend: as in
            :func:`hisa.dsa_index`.
        block_size: B, tokens per block (blocks tile the key buffer from position 0).
        block_topk: m, blocks kept per query; ``block_topk * block_size >= topk`` is required.
        super_size: Bs, blocks per super-block (>= 2), or None for two levels.
        super_topk: ms, super-blocks kept per query (>= 2), or None; given together with
            ``super_size``, and ``super_topk * super_size >= block_topk`` is required.
        pooled: optional block representatives fp32/bf16/fp16 [ceil(S / B), D], row b for keys
            [b * B, (b + 1) * B) (the dequantized mean, as the default pools it). A caller that
            keeps them incrementally (a decode cache pools each block once, when it completes)
            passes them here instead of having every call re-pool the whole key buffer. A row
            is read only for a block that is eligible but neither first nor last for some
            query; an incomplete tail block never is (it is forced for every query that can
            see it), so its row may hold any finite placeholder. With the super-block level a
            row also enters its super-block's mean, which is read under the same condition
            (a super-block neither first nor last for a query holds no first or last block).
            The Triton path stores them like its own pooling does (fp32,
            :mod:`hisa.ops.indexer.reps`).
        plan: the :class:`WindowPlan` :func:`plan_windows` read from these ``ks`` / ``ke``
            (same tensors, same ``num_keys`` = ``k.shape[0]`` and parameters; checked by
            :func:`check_plan`). Every window fact the call needs is then known and the call
            makes no host sync (the flat route's logits tiles included): a caller that runs
            many calls over the same windows (the layers of one engine step) reads them once.
            The call computes on the plan's copies of the windows, so it selects for the
            windows as planned (an in-place write to inference tensors after planning goes
            unseen by the check; it cannot push the kernels past their buffers). Without a
            plan the call reads the windows itself (one host sync), validating them as it
            does.

    Returns:
        int32 [T, topk] offsets relative to ks[t], -1 padded (and fp32 scores when asked).

    Example:
        >>> idx = hisa.hisa_index(q, k, w, ks, ke, topk=2048, block_size=128, block_topk=64)
        >>> idx = hisa.hisa_index(q, k, w, ks, ke, super_size=2, super_topk=128)  # 1M keys
    """
    T, _, _, S = check_indexer_inputs(q, k, weights, ks, ke, k_scale)
    topk, block_size, block_topk = check_hisa_params(topk=topk, block_size=block_size,
                                                     block_topk=block_topk)
    sup = check_super_params(block_topk=block_topk, super_size=super_size,
                             super_topk=super_topk)
    check_out_buffer(out, T, topk, q.device)
    if plan is None:
        # One host transfer for every window fact of the call (validation included).
        on_torch = backend == "torch"
        plan = read_window_plan(ks, ke, S, topk=topk, block_size=block_size,
                                block_topk=block_topk, fused=False if on_torch else None,
                                flat_tiles=False if on_torch else None, **sup)
    else:
        check_plan(plan, ks, ke, S, topk=topk, block_size=block_size, block_topk=block_topk,
                   super_size=sup.get("super_size"), super_topk=sup.get("super_topk"))
        ks, ke = plan.windows          # the windows the facts were read from
    if pooled is not None:
        check_pooled(pooled, k, block_size)
    if resolve_backend(backend, q.device,
                       lambda: _kernel_check(q, k, ks, ke, block_size, block_topk, **sup,
                                             plan=plan)
                       ) == "torch":
        reference = naive_hisa_index_super if sup else naive_hisa_index
        idx, scores = reference(q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                                block_size=block_size, block_topk=block_topk, pooled=pooled,
                                **sup)
    else:
        if backend == "triton":   # "auto" checked the kernels' limits while resolving
            # They hold for every call, routed or not: a shape's acceptance must not depend
            # on whether this call's windows happen to prune.
            _kernel_check(q, k, ks, ke, block_size, block_topk, **sup, plan=plan)
        if plan.nothing_pruned:
            # Exact regime (short contexts, L <= m * B): the same set, faster by the flat path.
            from ..dsa.prefill import dsa_index_triton
            idx, scores = dsa_index_triton(q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                                           out=out, need_scores=return_scores,
                                           span=plan.span, tiles=plan.flat_tiles)
        else:
            from .pipeline import hisa_index_triton
            idx, scores = hisa_index_triton(q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                                            block_size=block_size, block_topk=block_topk, out=out,
                                            need_scores=return_scores, pooled=pooled,
                                            windows=plan, **sup)
    if plan.short_pruned:         # rare: otherwise no short window lost a block
        keep_short_windows(idx, scores, q, k, weights, ks, ke, k_scale=k_scale, topk=topk,
                           block_size=block_size, block_topk=block_topk, **sup)
    return finish_output(idx, scores, out=out, return_scores=return_scores)
