"""Top-k selection shared by the flat DSA path and the HISA stages (Triton).

Scores are fp32. Each is mapped to a uint32 key (``_ordered_key``) that encodes the selection
rule of :mod:`hisa.ops.dsa.naive` (the twin ``selection_rank`` gives the same numbers): 0 for the
outside-the-window marker ``OUTSIDE`` (never selected), 1 for NaN, then the order-preserving map
of the float (-inf < finite < +inf), and ``FORCED_KEY`` above every score for HISA's forced
blocks. "The k largest scores" becomes "the k largest keys", keys > 0 only.

* ``_bisect_threshold`` finds, bit by bit, the largest key ``thr`` with at least ``need`` keys
  ``>= thr``: one ``tl.sum`` per bit over a register-resident row, no sort.
* ``_select_mask`` keeps every key ``> thr`` and the first ``need - #(> thr)`` keys equal to
  ``thr`` in index order, so ties go to the lower index, as in the references.

Rows that fit in registers (HISA's m*B = 8,192 candidates, block rows) are selected in one
program (``select.py`` and the fused stages call these helpers). Wide rows (flat DSA, 8K..256K
keys) use :func:`topk_rows`, two launches. The fast kernel selects a row whose window fits
``TOPK_FAST_CAP`` registers directly; a wider row gets a threshold from a strided sample, one
pass keeps the scores at or above it in a per-program scratch (L2-resident), and the kept ones
are selected in registers when they are at least k and fit. Every other row (expected to keep
too many, or the sample missed) is listed, unwritten, for the general kernel: a sampled
threshold into a wider scratch, else one pass builds a histogram of the top ``TOPK_HIST_BITS``
key bits, a second writes every key of a higher bin straight to the output and gathers the
threshold bin into the scratch, and a register bisection finishes the low bits. A threshold bin
that overflows the scratch (massive ties) falls back to bisection passes over the row: slow,
never wrong. The split keeps the fast kernel's registers low (the histogram path alone needs
255 a thread), so more rows run at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.sizes import next_pow2
from ..dsa.naive import FORCED_RANK, OUTSIDE_BITS

#: Keys of the threshold bin kept in registers by :func:`topk_rows` (else the slow fallback).
TOPK_SCRATCH = 8192
#: Top key bits histogrammed by the first pass of :func:`topk_rows` (4,096 bins).
TOPK_HIST_BITS = 12
#: Row chunk streamed per iteration by :func:`topk_rows`.
TOPK_CHUNK = 2048
#: Scores sampled per wide row to place the candidate threshold (the fast path).
TOPK_SAMPLE = 4096
#: Register width of the fast kernel's selection: rows whose window or sampled candidates
#: need more, and windows up to TOPK_SCRATCH keys (faster in the general kernel's one-shot
#: register selection), go to the general kernel (:func:`topk_rows`).
TOPK_FAST_CAP = 4096
#: Warps and register cap of the fast kernel: 4 warps at <= 168 registers a thread leave room
#: for three rows in flight per SM (120 bytes spilled at the bench's shape on sm_90; 220
#: registers uncapped, two rows); the general kernel, with the 4,096-bin histogram, takes 255
#: and spills 944 bytes (`python benchmarks/sass_count.py topk_fast --warps 4 --maxnreg 168`,
#: `... topk_general --warps 4`). H200: the cap was 2-7 % faster (benchmarks/topk_probe.py).
TOPK_FAST_WARPS = 4
TOPK_FAST_MAXNREG = 168
#: The fast kernel's pass loads chunk c + 1 before it scans chunk c (one chunk of registers
#: more), so a row's chunks do not each wait a full memory latency.
TOPK_FAST_PREFETCH = True
#: Row chunk of the fast kernel's pass. H200, 4,096 rows of 32K / 64K / 128K keys
#: (benchmarks/topk_probe.py): 2,048 -> 0.88 / 1.40 / 2.66 ms, 1,024 -> 0.69 / 1.04 / 2.08 ms
#: (the general kernel: 1.21 / 2.02 / 3.74 ms).
TOPK_FAST_CHUNK = 1024


#: fp32 bits of the outside-the-window marker in score buffers (a signalling NaN).
OUTSIDE = tl.constexpr(OUTSIDE_BITS)
#: Key of a forced entry: above every score's key.
FORCED_KEY = tl.constexpr(FORCED_RANK)


@triton.jit
def _ordered_key(v):
    """fp32 -> uint32 selection key: OUTSIDE -> 0, NaN -> 1, else order-preserving
    (-inf -> 0x7FFFFF, +inf -> 0xFF800000; -0.0 as +0.0). Integer ops only (a float compare
    would see the marker as a NaN)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, tl.zeros_like(bits), bits)
    key = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    key = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, tl.full(key.shape, 1, tl.uint32), key)
    return tl.where(bits == OUTSIDE, tl.zeros_like(key), key)


@triton.jit
def _masked_key(v, inside):
    """``_ordered_key`` where ``inside``, 0 (never selected) elsewhere."""
    key = _ordered_key(v)
    return tl.where(inside, key, tl.zeros_like(key))


@triton.jit
def _force_key(key, forced):
    """Keys of ``forced`` entries (that are selectable at all) raised above every score."""
    return tl.where(forced & (key > 0), tl.full(key.shape, FORCED_KEY, tl.uint32), key)


@triton.jit
def _force_ends(key, idx, N_PAD: tl.constexpr):
    """Keys of the first and the last selectable entry of a row (key > 0, in ``idx`` order)
    raised above every score: a row's forced pair when its eligible range is not contiguous
    from 0 (the candidate blocks of the three-level path, where padding and blocks outside the
    window sit between and around them)."""
    lo = tl.min(tl.where(key > 0, idx, N_PAD), axis=0)
    hi = tl.max(tl.where(key > 0, idx, -1), axis=0)
    return _force_key(key, (idx == lo) | (idx == hi))


@triton.jit
def _outside_like(v):
    """The OUTSIDE marker as fp32, shaped like ``v``."""
    return tl.full(v.shape, OUTSIDE, tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def _relu(x):
    """ReLU that keeps NaN (the references' ``clamp_min``); a plain maximum drops it on GPUs."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


#: fp32 bits of the NaN a NaN score comes back as: the positive quiet NaN. The ordered key
#: keeps no payload or sign, and the plain inverse of key 1 (0xFFFFFFFE) is a negative NaN,
#: which torch.sort on CUDA put below -inf in the GPU tests (it sorts by the bits, as a radix
#: sort does; the CPU sort puts every NaN last), so returned scores sorted unlike the
#: reference's.
QUIET_NAN = tl.constexpr(0x7FC00000)


@triton.jit
def _key_to_float(key):
    """Inverse of ``_ordered_key`` for keys > 0; key 1 (NaN) gives :data:`QUIET_NAN`."""
    bits = tl.where(key >= 0x80000000, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    bits = tl.where(key == 1, tl.full(bits.shape, QUIET_NAN, tl.uint32), bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bisect_threshold(keys, need, thr, NBITS: tl.constexpr):
    """Largest ``t`` sharing ``thr``'s bits above the low ``NBITS`` with #(keys >= t) >= need.

    Returns ``thr`` itself (low bits zero) when no such ``t`` exists among those candidates.
    """
    for i in tl.static_range(NBITS):
        cand = thr | (1 << (NBITS - 1 - i))
        cnt = tl.sum((keys >= cand).to(tl.int32), axis=0)
        thr = tl.where(cnt >= need, cand, thr)
    return thr


#: Count field width of the packed RADIX = 2 reduction of :func:`_radix_threshold` (rows up
#: to 2**21 - 1 keys).
PACK_BITS = tl.constexpr(21)
PACK_BITS2 = tl.constexpr(42)
PACK_MASK = tl.constexpr((1 << 21) - 1)


#: Count passes of the ``RADIX = 0`` search (:func:`_interp_threshold`) that may use an
#: interpolated guess; from then on it bisects what is left of its bracket: the worst case is
#: INTERP_STEPS + 32 passes, against 32 for ``RADIX = 1``.
INTERP_STEPS = tl.constexpr(12)


@triton.jit
def _sums_min_max(a1, b1, lo1, hi1, a2, b2, lo2, hi2):
    return a1 + a2, b1 + b2, tl.minimum(lo1, lo2), tl.maximum(hi1, hi2)


#: Keys of -inf and +inf: the finite scores' keys lie strictly between.
NEG_INF_KEY = tl.constexpr(0x007FFFFF)
POS_INF_KEY = tl.constexpr(0xFF800000)


@triton.jit
def _interp_threshold(keys, need, STEPS: tl.constexpr):
    """The ``RADIX = 0`` threshold search: regula falsi on the scores' values.

    Keeps a bracket of keys [lo, hm] holding the k-th largest, #(keys >= lo) > need >
    #(keys > hm), and guesses the next threshold by linear interpolation of the two counts
    in *value* space (the keys' floats), where a smooth score distribution makes the count
    nearly linear near the k-th score; the Illinois rule halves the weight of an end kept
    twice in a row, so the guesses close in from both sides. The bracket starts at the
    smallest and largest *finite* selectable key when the k-th lies between them (the usual
    case: +inf scores and forced entries, above every finite one, and NaN / -inf ones below
    are only counted), else at the whole key range. A guess that is not strictly inside the
    bracket, and every pass from the ``STEPS``-th on, bisects the bracket in key space
    instead. It stops when exactly ``need`` keys are at or above the last guess, or when the
    bracket is one key (lo is then the k-th largest key, ties at it resolved by
    ``_select_mask``). Each pass is one count over the row, as one bit of ``RADIX = 1``; the
    aim is fewer passes (one reduction starts it: three counts and the finite ends;
    CPU emulation, ``benchmarks/select_passes.py``: 10 passes against 22 on real candidate
    rows, 18 against 19 on log-normal scores). Returns 0 when at most ``need`` keys are
    selectable (all of them are then the selection). Rows up to 65,535 keys (two counts
    share 32 bits; the register selections hold at most 32,768).
    """
    sel = keys > 0
    low = sel & (keys <= NEG_INF_KEY)                        # NaN (key 1) and -inf
    high = keys >= POS_INF_KEY                               # +inf and forced entries
    fin = sel & ~low & ~high
    packed = sel.to(tl.int32) + (low.to(tl.int32) << 16)     # two counts in 32 bits
    s, n_high, lo_f, hm_f = tl.reduce(
        (packed, high.to(tl.int32),
         tl.where(fin, keys, tl.full(keys.shape, 0xFFFFFFFF, tl.uint32)),
         tl.where(fin, keys, tl.zeros_like(keys))), 0, _sums_min_max)
    n_pos = s & 0xFFFF
    n_ge_fin = n_pos - (s >> 16)                             # keys >= lo_f
    # n_high: keys > hm_f
    finite_ends = (n_ge_fin > need) & (n_high < need)
    # uint32 throughout (64-bit scalars cost double); the whole range [1, 2**32 - 1] else.
    lo = tl.where(finite_ends, lo_f, 1)
    hm = tl.where(finite_ends, hm_f, 0xFFFFFFFF)
    f_lo = (tl.where(finite_ends, n_ge_fin, n_pos) - need).to(tl.float32)    # > 0
    f_hi = (tl.where(finite_ends, n_high, 0) - need).to(tl.float32)          # < 0
    moved = tl.zeros([], dtype=tl.int32)                     # 1: lo moved last, 2: hm
    step = tl.zeros([], dtype=tl.int32)
    go = n_pos > need
    while go:
        mid = lo + (hm - lo + 1) // 2                        # in (lo, hm]
        lo_v = _key_to_float(lo)
        hi_v = _key_to_float(hm)
        finite = (tl.abs(lo_v) < float("inf")) & (tl.abs(hi_v) < float("inf"))
        lo_v = tl.where(finite, lo_v, 0.0)                   # no inf - inf below
        hi_v = tl.where(finite, hi_v, 0.0)
        guess = _ordered_key(lo_v + (hi_v - lo_v) * (f_lo / (f_lo - f_hi)))
        use = (step < STEPS) & finite & (guess > lo) & (guess <= hm)
        g = tl.where(use, guess, mid)
        cnt = tl.sum((keys >= g).to(tl.int32), axis=0)
        f = (cnt - need).to(tl.float32)
        up = cnt >= need
        f_hi = tl.where(up & (moved == 1), f_hi * 0.5, f_hi)   # Illinois: hm kept twice
        f_lo = tl.where(~up & (moved == 2), f_lo * 0.5, f_lo)  # lo kept twice
        lo = tl.where(up, g, lo)
        f_lo = tl.where(up, f, f_lo)
        hm = tl.where(up, hm, g - 1)
        f_hi = tl.where(up, f_hi, f)
        moved = tl.where(up, 1, 2)
        step += 1
        go = (cnt != need) & (hm > lo)
    return tl.where(n_pos > need, lo, 0)


@triton.jit
def _radix_threshold(keys, need, RADIX: tl.constexpr, COUNT_FIRST: tl.constexpr = False):
    """A key ``thr`` for which ``_select_mask(keys, need, thr)`` is the top ``need`` of keys:
    ``RADIX`` 1, 2 or 8 bits settled per count pass (:func:`_bit_threshold`), or 0 for the
    interpolation search (:func:`_interp_threshold`).

    ``COUNT_FIRST``: count the selectable keys before a bit search and skip it (thr = 0: every
    one of them) when there are at most ``need``; one reduction against up to 32 passes that
    each find fewer than ``need`` keys, worth it where such rows are common (the prefill token
    select: the queries with at most k keys in their window, an eighth of a 16K causal
    prefill), not in the decode selections, whose rows are latency-bound and rarely short.
    The interpolation search always makes that count (in its first reduction)."""
    if RADIX == 0:
        thr = _interp_threshold(keys, need, INTERP_STEPS)
    elif COUNT_FIRST:
        thr = tl.zeros([], dtype=tl.uint32)
        if tl.sum((keys > 0).to(tl.int32), axis=0) > need:
            thr = _bit_threshold(keys, need, RADIX)
    else:
        thr = _bit_threshold(keys, need, RADIX)
    return thr


@triton.jit
def _bit_threshold(keys, need, RADIX: tl.constexpr):
    """A key ``thr`` for which ``_select_mask(keys, need, thr)`` is the top ``need`` of keys.

    The same selected set as a 32-step :func:`_bisect_threshold`, in fewer cross-warp
    reductions: the search stops as soon as an accepted threshold has exactly ``need`` keys at
    or above it (that set already is the top ``need``), which for continuous scores skips the
    low mantissa bits. ``RADIX = 2`` settles two bits per pass by counting three candidates in
    one int64 ``tl.sum`` of packed indicators; on H200 rows of 1K-8K keys it measured slower
    than ``RADIX = 1`` (benchmarks/decode_notes.md). ``RADIX = 8`` settles a byte per pass
    (at most 4): one 256-bin ``tl.histogram`` of the next byte of the keys that match the bits
    settled so far, then the byte whose suffix count first reaches the keys still needed
    (a radix select; its early exit is the same); on an H200 it measured 2.5x slower than
    ``RADIX = 1`` for the prefill token select and 7-10 us slower per decode step, kept for
    probes. Returns 0 when fewer than ``need`` keys
    are positive.
    """
    thr = tl.zeros([], dtype=tl.uint32)
    shift = tl.full([], 32, tl.int32)
    rem = tl.zeros([], dtype=tl.int32) + need       # RADIX 8: keys still to take at the prefix
    go = shift > 0
    while go:
        shift -= RADIX
        one = tl.full([], 1, tl.uint32) << shift.to(tl.uint32)
        if RADIX == 8:
            upper = shift + 8                             # bits >= upper are settled in thr
            high = tl.full([], 0xFFFFFFFF, tl.uint32) << tl.minimum(upper, 31).to(tl.uint32)
            high = tl.where(upper >= 32, tl.zeros_like(high), high)
            match = (keys & high) == thr
            digit = ((keys >> shift.to(tl.uint32)) & 0xFF).to(tl.int32)
            hist = tl.histogram(digit, 256, mask=match)                            # [256]
            bins = tl.arange(0, 256)
            at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist     # digit >= bin
            d = tl.maximum(tl.sum((at_least >= rem).to(tl.int32), axis=0) - 1, 0)
            ge_d = tl.sum(tl.where(bins == d, at_least, 0), axis=0)
            above = ge_d - tl.sum(tl.where(bins == d, hist, 0), axis=0)           # digit > d
            thr = thr | (d.to(tl.uint32) << shift.to(tl.uint32))
            # Exactly the keys still needed at or above this byte: the top set is settled.
            cnt = tl.where(ge_d == rem, need, -1)
            rem = rem - above
        elif RADIX == 2:
            c1 = thr | one
            c2 = thr | (one << 1)
            c3 = c2 | one
            packed = ((keys >= c1).to(tl.int64) + ((keys >= c2).to(tl.int64) << PACK_BITS)
                      + ((keys >= c3).to(tl.int64) << PACK_BITS2))
            s = tl.sum(packed, axis=0)
            n1 = (s & PACK_MASK).to(tl.int32)
            n2 = ((s >> PACK_BITS) & PACK_MASK).to(tl.int32)
            n3 = (s >> PACK_BITS2).to(tl.int32)
            cnt = tl.where(n3 >= need, n3, tl.where(n2 >= need, n2, tl.where(n1 >= need, n1,
                                                                              0)))
            thr = tl.where(n3 >= need, c3, tl.where(n2 >= need, c2, tl.where(n1 >= need, c1,
                                                                             thr)))
        else:
            c1 = thr | one
            cnt = tl.sum((keys >= c1).to(tl.int32), axis=0)
            thr = tl.where(cnt >= need, c1, thr)
        go = (shift > 0) & (cnt != need)
    return thr


@triton.jit
def _select_mask(keys, need, thr):
    """Keys > thr, plus the first (need - #(> thr)) keys == thr in index order (thr > 0);
    every selectable key (key > 0) for thr = 0."""
    sel, _ = _select_mask_count(keys, need, thr)
    return sel


@triton.jit
def _select_mask_count(keys, need, thr):
    """(``_select_mask(keys, need, thr)``, the number of entries it selects), from the one
    count the mask needs anyway: a caller that pads its output after the selected entries
    would otherwise reduce the mask a second time (a full cross-warp reduction, as costly as
    a pass of the threshold search in the latency-bound register selections)."""
    ge = keys >= tl.maximum(thr, 1)          # thr = 0: keys > 0, every selectable one
    n_ge = tl.sum(ge.to(tl.int32), axis=0)
    if (n_ge > need) & (thr > 0):
        # Ties at thr: keep the lowest-index ones (one scan, only on rows that need it).
        gt = keys > thr
        eq = ge & ~gt
        n_gt = tl.sum(gt.to(tl.int32), axis=0)
        sel = gt | (eq & (tl.cumsum(eq.to(tl.int32), axis=0) <= need - n_gt))
    else:
        sel = ge
    # The ties' branch keeps exactly need (n_gt < need < n_ge for thr the need-th key); the
    # other keeps all n_ge, at most need there (thr = 0 only when at most need are selectable).
    return sel, tl.minimum(n_ge, need)


@triton.jit
def _select_row(keys, need, RADIX: tl.constexpr, COUNT_FIRST: tl.constexpr = False):
    """(selection mask, output slot of each selected entry, number selected) of the top
    ``need`` of a register row of selection keys (``_ordered_key``: key 0 never selected; ties
    to the lower index): the threshold search, the mask and one scan for the slots, in index
    order. Every register selection that writes its entries to consecutive slots uses it but
    the token rows, whose slots come per block (``select._store_candidates``)."""
    sel, n_sel = _select_mask_count(keys, need,
                                    _radix_threshold(keys, need, RADIX, COUNT_FIRST))
    return sel, tl.cumsum(sel.to(tl.int32), axis=0) - 1, n_sel


@triton.jit
def _tile_row(x_ptr, stride_x, ks_ptr, ke_ptr, t0, lo, r, out_idx_ptr, out_val_ptr,
              stride_out):
    """Row r of a logits tile: its window length, the pointer to its first in-window score
    and to its output rows (query t0 + r)."""
    t = t0 + r
    s0 = tl.load(ks_ptr + t)
    n = tl.load(ke_ptr + t) - s0
    row = x_ptr + tl.cast(r, tl.int64) * stride_x + (s0 - lo)
    return (n, row, out_idx_ptr + t.to(tl.int64) * stride_out,
            out_val_ptr + t.to(tl.int64) * stride_out)


@triton.jit
def _sample_rank(n, K: tl.constexpr, NS: tl.constexpr):
    """Rank among NS evenly spaced samples of n scores at which to put the candidate
    threshold: safely above the expected rank of the K-th score (lam + 4 sqrt(lam) + 4,
    lam = K * NS / n), so about K * (1 + 4 / sqrt(lam)) scores clear it."""
    lam = K * NS / n.to(tl.float32)
    return tl.minimum((lam + 4.0 * tl.sqrt(lam) + 4.0).to(tl.int32), NS)


@triton.jit
def _select_store(key, col, out_idx, out_val, kk, K: tl.constexpr, WRITE_VALS: tl.constexpr):
    """The top K of a register row of keys (their columns ``col``) written to a query's output
    row, -1 / -inf padded."""
    sel, ps, n_sel = _select_row(key, K, 1)
    tl.store(out_idx + ps, col, mask=sel)
    if WRITE_VALS:
        tl.store(out_val + ps, _key_to_float(key), mask=sel)
    tl.store(out_idx + kk, -1, mask=(kk >= n_sel) & (kk < K))
    if WRITE_VALS:
        tl.store(out_val + kk, float("-inf"), mask=(kk >= n_sel) & (kk < K))


@triton.jit
def _sampled_candidates(row, n, scr_key, scr_col, offs, ci, K: tl.constexpr,
                        NS: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr,
                        PREFETCH: tl.constexpr):
    """The scores of a row of n (> CAP) that clear a threshold set from NS evenly spaced
    samples (at :func:`_sample_rank`), as (ok, keys [CAP], columns [CAP]); ok when at least K
    and at most CAP cleared it (the K largest are then among them).

    A threshold at or above -inf's key is a number's: the pass compares the floats themselves
    (NaN and the outside marker compare false, as their keys 1 and 0 fall below it), keeps
    their bits and columns in the per-program scratch in row order (ties keep the lower
    index), and the keys are made once, from the kept ones. A lower one (a sample of mostly
    NaN or outside entries) is not ok. ``PREFETCH``: chunk c + 1's load is in flight while
    chunk c is scanned (one chunk of registers more)."""
    si = tl.arange(0, NS)
    sv = tl.load(row + (si.to(tl.int64) * n) // NS)
    thr_s = _radix_threshold(_ordered_key(sv), _sample_rank(n, K, NS), 1)
    ok = tl.full([], False, tl.int1)
    key = tl.zeros([CAP], dtype=tl.uint32)
    col = ci
    if thr_s >= 0x7FFFFF:
        thr_f = _key_to_float(thr_s)
        tl.debug_barrier()  # the previous row's scratch reads are done
        n_c = tl.zeros([], dtype=tl.int32)
        v_next = tl.load(row + offs, mask=offs < n, other=float("-inf"))
        for c in range(0, n, CHUNK):
            m = c + offs < n
            if PREFETCH:
                v = v_next
                nxt = c + CHUNK + offs
                v_next = tl.load(row + nxt, mask=nxt < n, other=float("-inf"))
            else:
                v = tl.load(row + c + offs, mask=m, other=float("-inf"))
            keep = m & (v >= thr_f)
            pk = n_c + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            tl.store(scr_key + pk, v.to(tl.uint32, bitcast=True), mask=keep & (pk < CAP))
            tl.store(scr_col + pk, c + offs, mask=keep & (pk < CAP))
            n_c += tl.sum(keep.to(tl.int32), axis=0)
        ok = (n_c >= K) & (n_c <= CAP)
        tl.debug_barrier()
        kept = tl.load(scr_key + ci, mask=ci < n_c, other=0, cache_modifier=".cg")
        key = _masked_key(kept.to(tl.float32, bitcast=True), ci < n_c)
        col = tl.load(scr_col + ci, mask=ci < n_c, other=0, cache_modifier=".cg")
    return ok, key, col


@triton.jit
def _topk_rows_kernel(x_ptr, stride_x, ks_ptr, ke_ptr, t0, lo, n_rows,
                      out_idx_ptr, out_val_ptr, stride_out, scr_key_ptr, scr_col_ptr,
                      rows_ptr, n_listed_ptr,
                      K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr,
                      HBITS: tl.constexpr, CAP: tl.constexpr, NS: tl.constexpr,
                      WRITE_VALS: tl.constexpr, LISTED: tl.constexpr):
    # Row r of x holds key positions [lo, lo + stride_x); query t0 + r reads [ks, ke) of it and
    # its output row t0 + r gets offsets relative to ks. LISTED: only the rows listed at
    # rows_ptr (their count at n_listed_ptr, written by the fast kernel before this launch).
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, CHUNK)
    kk = tl.arange(0, K_PAD)
    scr_key = scr_key_ptr + pid.to(tl.int64) * CAP
    scr_col = scr_col_ptr + pid.to(tl.int64) * CAP
    n_work = n_rows
    if LISTED:
        n_work = tl.load(n_listed_ptr)
    for i in range(pid, n_work, nprog):
        r = i
        if LISTED:
            r = tl.load(rows_ptr + i)
        n, row, out_idx, out_val = _tile_row(x_ptr, stride_x, ks_ptr, ke_ptr, t0, lo, r,
                                             out_idx_ptr, out_val_ptr, stride_out)
        ci = tl.arange(0, CAP)
        done = n <= CAP
        if done:
            # The whole window fits in registers: one exact selection.
            key = _masked_key(tl.load(row + ci, mask=ci < n, other=0.0), ci < n)
            col = ci
        else:
            # The sampled candidates into the scratch, else the histogram path below.
            done, key, col = _sampled_candidates(row, n, scr_key, scr_col, offs, ci, K, NS,
                                                 CAP, CHUNK, False)
        if done:
            _select_store(key, col, out_idx, out_val, kk, K, WRITE_VALS)
        else:
            _topk_row_histogram(row, n, out_idx, out_val, scr_key, scr_col, offs, kk, K,
                                CHUNK, HBITS, CAP, WRITE_VALS)


@triton.jit
def _topk_rows_fast_kernel(x_ptr, stride_x, ks_ptr, ke_ptr, t0, lo, n_rows,
                           out_idx_ptr, out_val_ptr, stride_out, scr_key_ptr, scr_col_ptr,
                           left_ptr, n_left_ptr,
                           K: tl.constexpr, K_PAD: tl.constexpr, CHUNK: tl.constexpr,
                           CAP: tl.constexpr, SCR: tl.constexpr, NS: tl.constexpr,
                           WRITE_VALS: tl.constexpr, PREFETCH: tl.constexpr):
    # The rows of x as in _topk_rows_kernel. A row is selected here when its window fits CAP
    # registers, or when it is wider than the general kernel's register row (SCR: narrower
    # ones are faster in its one-shot selection) and its sampled candidates fit CAP (the same
    # pass as the general kernel's, in fewer registers); any other row is appended to
    # left_ptr (count at n_left_ptr) for _topk_rows_kernel, unwritten.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, CHUNK)
    kk = tl.arange(0, K_PAD)
    ci = tl.arange(0, CAP)
    scr_key = scr_key_ptr + pid.to(tl.int64) * SCR
    scr_col = scr_col_ptr + pid.to(tl.int64) * SCR
    for r in range(pid, n_rows, nprog):
        n, row, out_idx, out_val = _tile_row(x_ptr, stride_x, ks_ptr, ke_ptr, t0, lo, r,
                                             out_idx_ptr, out_val_ptr, stride_out)
        done = n <= CAP
        key = tl.zeros([CAP], dtype=tl.uint32)
        col = ci
        if done:
            key = _masked_key(tl.load(row + ci, mask=ci < n, other=0.0), ci < n)
        else:
            rank = _sample_rank(n, K, NS)
            # About n * rank / NS scores clear the sampled threshold: rows expected to fill
            # more than 13/16 of the registers (3 standard deviations at 128K keys) go to the
            # general kernel unread.
            if (n > SCR) & (n.to(tl.int64) * rank <= (13 * CAP // 16) * NS):
                done, key, col = _sampled_candidates(row, n, scr_key, scr_col, offs, ci, K,
                                                     NS, CAP, CHUNK, PREFETCH)
        if done:
            _select_store(key, col, out_idx, out_val, kk, K, WRITE_VALS)
        else:
            slot = tl.atomic_add(n_left_ptr, 1)
            tl.store(left_ptr + slot, r)


@triton.jit
def _topk_row_histogram(row, n, out_idx, out_val, scr_key, scr_col, offs, kk,
                        K: tl.constexpr, CHUNK: tl.constexpr, HBITS: tl.constexpr,
                        CAP: tl.constexpr, WRITE_VALS: tl.constexpr):
    """The general path of one wide row (histogram, filter, bisection; see module doc)."""
    SHIFT: tl.constexpr = 32 - HBITS
    NBINS: tl.constexpr = 1 << HBITS
    # Pass 1: histogram of the top HBITS key bits of the selectable keys (key > 0); bin 0 holds
    # the NaN scores (key 1), the lowest selectable ones.
    hist = tl.zeros([NBINS], dtype=tl.int32)
    for c in range(0, n, CHUNK):
        m = c + offs < n
        key = _masked_key(tl.load(row + c + offs, mask=m, other=0.0), m)
        hist += tl.histogram((key >> SHIFT).to(tl.int32), NBINS, mask=key > 0)
    suffix = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist   # #keys in bins >= b
    # The threshold bin: the highest bin with at least K keys at or above it; bin 0 when the
    # row has fewer than K selectable keys (then every one of them is selected).
    tb = tl.maximum(tl.sum((suffix >= K).to(tl.int32), axis=0) - 1, 0)
    tbu = tb.to(tl.uint32)
    # Pass 2: bins above tb go to the output, the threshold bin to the scratch.
    tl.debug_barrier()  # the previous row's scratch reads are done
    n_out = tl.zeros([], dtype=tl.int32)
    n_eq = tl.zeros([], dtype=tl.int32)
    for c in range(0, n, CHUNK):
        m = c + offs < n
        v = tl.load(row + c + offs, mask=m, other=0.0)
        key = _masked_key(v, m)
        b = key >> SHIFT
        above = (b > tbu) & (key > 0)
        eq = (b == tbu) & (key > 0)
        pa = n_out + tl.cumsum(above.to(tl.int32), axis=0) - 1
        tl.store(out_idx + pa, c + offs, mask=above)
        if WRITE_VALS:
            tl.store(out_val + pa, v, mask=above)
        pe = n_eq + tl.cumsum(eq.to(tl.int32), axis=0) - 1
        tl.store(scr_key + pe, key, mask=eq & (pe < CAP))
        tl.store(scr_col + pe, c + offs, mask=eq & (pe < CAP))
        n_out += tl.sum(above.to(tl.int32), axis=0)
        n_eq += tl.sum(eq.to(tl.int32), axis=0)
    need = K - n_out
    thr0 = tbu << SHIFT
    if n_eq <= CAP:
        # Pass 3: bisect the low bits over the threshold bin, in registers. With fewer than
        # `need` keys in the bin the threshold stays thr0 and every key of the bin is taken.
        tl.debug_barrier()
        ci = tl.arange(0, CAP)
        ck = tl.load(scr_key + ci, mask=ci < n_eq, other=0, cache_modifier=".cg")
        thr = _bisect_threshold(ck, need, thr0, SHIFT)
        sel = _select_mask(ck, need, thr)
        cols = tl.load(scr_col + ci, mask=sel, other=0, cache_modifier=".cg")
        ps = n_out + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        tl.store(out_idx + ps, cols, mask=sel)
        if WRITE_VALS:
            tl.store(out_val + ps, _key_to_float(ck), mask=sel)
        n_out += tl.sum(sel.to(tl.int32), axis=0)
    else:
        # Fallback for huge ties: the same bisection, one pass over the row per bit.
        thr = thr0
        for i in range(SHIFT):
            cand = thr | (tl.full([], 1, tl.uint32) << tl.cast(SHIFT - 1 - i, tl.uint32))
            cnt = tl.zeros([], dtype=tl.int32)
            for c in range(0, n, CHUNK):
                m = c + offs < n
                key = _masked_key(tl.load(row + c + offs, mask=m, other=0.0), m)
                cnt += tl.sum((((key >> SHIFT) == tbu) & (key >= cand) & (key > 0)).to(tl.int32),
                              axis=0)
            thr = tl.where(cnt >= need, cand, thr)
        n_gt = tl.zeros([], dtype=tl.int32)
        for c in range(0, n, CHUNK):
            m = c + offs < n
            key = _masked_key(tl.load(row + c + offs, mask=m, other=0.0), m)
            n_gt += tl.sum((((key >> SHIFT) == tbu) & (key > thr) & (key > 0)).to(tl.int32),
                           axis=0)
        n_tie = need - n_gt
        for c in range(0, n, CHUNK):
            m = c + offs < n
            v = tl.load(row + c + offs, mask=m, other=0.0)
            key = _masked_key(v, m)
            inb = ((key >> SHIFT) == tbu) & (key > 0)
            tie = inb & (key == thr)
            sel = (inb & (key > thr)) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0)
                                                <= n_tie))
            ps = n_out + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            tl.store(out_idx + ps, c + offs, mask=sel)
            if WRITE_VALS:
                tl.store(out_val + ps, v, mask=sel)
            n_out += tl.sum(sel.to(tl.int32), axis=0)
            n_tie -= tl.sum(tie.to(tl.int32), axis=0)
    tl.store(out_idx + kk, -1, mask=(kk >= n_out) & (kk < K))
    if WRITE_VALS:
        tl.store(out_val + kk, float("-inf"), mask=(kk >= n_out) & (kk < K))


def persistent_programs(n_rows: int, device: torch.device, per_sm: int) -> int:
    """Grid size of a persistent launch: enough programs to fill the GPU, at most one per row."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, sms * per_sm))
    return max(1, min(n_rows, 4))  # the interpreter runs programs one after another


def topk_rows(x: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, *, t0: int, lo: int,
              topk: int, out_idx: torch.Tensor, out_val: torch.Tensor | None,
              scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
              left: tuple[torch.Tensor, torch.Tensor] | None = None,
              num_warps: int = 8) -> None:
    """Top-``topk`` of each query's window in a tile of logits rows: the fast kernel, then the
    general one over the rows it listed; one general launch over every row when the tile is
    no wider than its register row (``TOPK_SCRATCH``). See the module doc.

    Args:
        x: fp32 [R, W]; row r holds the scores of query t0 + r for key positions [lo, lo + W).
        ks, ke: int32 [T] windows (absolute key positions); [ks, ke) of t0 + r lies in the row.
        out_idx: int32 [T, topk]; rows t0 .. t0 + R - 1 get offsets relative to ks, -1 padded.
        out_val: fp32 [T, topk] aligned scores (-inf padded), or None.
        scratch: optional (uint32-as-int32 [P, TOPK_SCRATCH], int32 [P, TOPK_SCRATCH]) buffers
            reused across calls; P must be at least the persistent grid.
        left: optional (int32 [>= R] list, int32 [1] count, zero) for the rows the fast kernel
            leaves to the general one; a count must be zero before the call (one per call).
        num_warps: warps of the general kernel.
    """
    R, W = x.shape
    if R == 0:
        return
    grid = persistent_programs(R, x.device, 8)
    if scratch is None or scratch[0].shape[0] < grid:
        scratch = (torch.empty(grid, TOPK_SCRATCH, dtype=torch.int32, device=x.device),
                   torch.empty(grid, TOPK_SCRATCH, dtype=torch.int32, device=x.device))
    vals = out_val if out_val is not None else out_idx  # never written when WRITE_VALS is off
    listed = W > TOPK_SCRATCH   # else the fast pass would only list every row
    if listed:
        if left is None:
            buf = torch.zeros(R + 1, dtype=torch.int32, device=x.device)
            left = (buf[1:], buf[:1])
        _topk_rows_fast_kernel[(grid,)](
            x, W, ks, ke, t0, lo, R, out_idx, vals, out_idx.stride(0),
            scratch[0].view(torch.uint32), scratch[1], left[0], left[1],
            K=topk, K_PAD=next_pow2(topk), CHUNK=TOPK_FAST_CHUNK,
            CAP=min(TOPK_FAST_CAP, TOPK_SCRATCH), SCR=TOPK_SCRATCH,
            NS=min(TOPK_SAMPLE, TOPK_SCRATCH), WRITE_VALS=out_val is not None,
            PREFETCH=TOPK_FAST_PREFETCH, num_warps=TOPK_FAST_WARPS,
            **_maxnreg(x.device, TOPK_FAST_MAXNREG))
    general_topk_launch(x, ks, ke, t0=t0, lo=lo, topk=topk, out_idx=out_idx, vals=vals,
                        write_vals=out_val is not None, scratch=scratch, grid=grid,
                        left=left if listed else None, num_warps=num_warps)


def general_topk_launch(x, ks, ke, *, t0, lo, topk, out_idx, vals, write_vals, scratch, grid,
                        left, num_warps):
    """The general kernel over every row of ``x`` (``left`` None) or over the rows listed in
    ``left`` (list, count); :func:`topk_rows` and the top-k probe launch it so."""
    R, W = x.shape
    rows, n_left = left if left is not None else (out_idx, out_idx)   # unread unless listed
    _topk_rows_kernel[(grid,)](
        x, W, ks, ke, t0, lo, R, out_idx, vals, out_idx.stride(0),
        scratch[0].view(torch.uint32), scratch[1], rows, n_left,
        K=topk, K_PAD=next_pow2(topk), CHUNK=TOPK_CHUNK, HBITS=TOPK_HIST_BITS,
        CAP=TOPK_SCRATCH, NS=min(TOPK_SAMPLE, TOPK_SCRATCH), WRITE_VALS=write_vals,
        LISTED=left is not None, num_warps=num_warps)


def _maxnreg(device: torch.device, regs: int) -> dict:
    """The register cap as a launch option on CUDA (the interpreter takes no such option)."""
    return {"maxnreg": regs} if device.type == "cuda" else {}
