"""Count the reductions over a row that each threshold search of ``hisa.ops.indexer.topk``
makes, by emulating both in NumPy on CPU rows: the bit search (``RADIX = 1``: one count per
bit from the top, stopping once exactly k keys are at or above the threshold; the prefill token
select counts the selectable keys first) and the interpolation search (``RADIX = 0``:
``_interp_threshold``, one reduction of the counts and the finite ends first). Both must give
the same selected set on every row (checked). The GPU time per pass is what the select probe
measures; this only says how many passes there are, to write the prediction before a device
run.

    PYTHONPATH=. python3 benchmarks/select_passes.py

Rows: normal, squared-normal and log-normal scores (8,192 per row, k = 2,048), block rows
(1,024, k = 64, the first and last forced), the decode token select's (no count first), and
the real candidate scores of the reference pipeline on clustered inputs (16K and 64K context,
32 queries each, B = 128, m = 64).
"""
from __future__ import annotations

import numpy as np
import torch

from hisa.ops.dsa.naive import FORCED_RANK, selection_rank

INTERP_STEPS = 12      # hisa.ops.indexer.topk.INTERP_STEPS


def ordered_keys(v) -> np.ndarray:
    """fp32 scores -> the kernels' selection keys (``selection_rank``, the torch twin of
    ``_ordered_key``: 0 for the outside marker, 1 for NaN), int64."""
    return selection_rank(torch.as_tensor(np.asarray(v, dtype=np.float32))).numpy()


def key_value(key: int) -> float:
    """Inverse of ``ordered_keys`` for one key > 0 (NaN for key 1)."""
    bits = key ^ 0x80000000 if key >= 0x80000000 else key ^ 0xFFFFFFFF
    if key == 1:
        bits = 0x7FC00000
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


NEG_INF_KEY, POS_INF_KEY = 0x007FFFFF, 0xFF800000


def bit_search(keys: np.ndarray, need: int, precount: bool) -> tuple[int, int]:
    """(threshold, reductions) of RADIX = 1; ``precount``: behind the prefill token select's
    count of the selectable keys (the decode selections search at once)."""
    if precount and int((keys > 0).sum()) <= need:
        return 0, 1
    thr, n = 0, int(precount)
    for shift in range(31, -1, -1):
        cand = thr | (1 << shift)
        cnt = int((keys >= cand).sum())
        n += 1
        if cnt >= need:
            thr = cand
        if cnt == need:
            break
    return thr, n


def interp_search(keys: np.ndarray, need: int) -> tuple[int, int]:
    """(threshold, reductions) of RADIX = 0, step for step as the kernel (its guesses in fp32)."""
    sel = keys > 0
    low, high = sel & (keys <= NEG_INF_KEY), keys >= POS_INF_KEY
    fin = sel & ~low & ~high
    n_pos, n_ge_fin, n_high = int(sel.sum()), int(sel.sum() - low.sum()), int(high.sum())
    if n_pos <= need:
        return 0, 1
    if n_ge_fin > need and n_high < need:
        lo, hm = int(keys[fin].min()), int(keys[fin].max())
        f_lo, f_hi = np.float32(n_ge_fin - need), np.float32(n_high - need)
    else:
        lo, hm = 1, 0xFFFFFFFF
        f_lo, f_hi = np.float32(n_pos - need), np.float32(-need)
    moved, step, n = 0, 0, 1
    while True:
        g = lo + (hm - lo + 1) // 2
        lo_v, hi_v = np.float32(key_value(lo)), np.float32(key_value(hm))
        if step < INTERP_STEPS and np.isfinite(lo_v) and np.isfinite(hi_v):
            with np.errstate(over="ignore", invalid="ignore"):
                guess_v = np.float32(lo_v + (hi_v - lo_v) * np.float32(f_lo / (f_lo - f_hi)))
            guess = int(ordered_keys(np.array([guess_v]))[0])
            if lo < guess <= hm:
                g = guess
        cnt = int((keys >= g).sum())
        n += 1
        up = cnt >= need
        if up and moved == 1:
            f_hi = np.float32(f_hi * 0.5)
        if not up and moved == 2:
            f_lo = np.float32(f_lo * 0.5)
        if up:
            lo, f_lo = g, np.float32(cnt - need)
        else:
            hm, f_hi = g - 1, np.float32(cnt - need)
        moved, step = (1 if up else 2), step + 1
        if cnt == need or hm <= lo:
            return lo, n


def top_set(keys: np.ndarray, need: int, thr: int) -> np.ndarray:
    """The selected keys (values, not positions: ties make positions the mask's job)."""
    return np.sort(keys[(keys >= thr) & (keys > 0)])[::-1][:need]


def report(label: str, rows: np.ndarray, need: int, forced: bool = False,
           precount: bool = True) -> None:
    """``forced``: the first and last entry keyed FORCED_RANK, as the block selections do."""
    bits, interp = [], []
    for r in rows:
        k = ordered_keys(r)
        if forced:
            k[0] = k[-1] = FORCED_RANK
        t1, n1 = bit_search(k, need, precount)
        t0, n0 = interp_search(k, need)
        assert np.array_equal(top_set(k, need, t1), top_set(k, need, t0)), label
        bits.append(n1)
        interp.append(n0)
    print(f"{label:44s} bit {np.mean(bits):5.1f} (max {max(bits):2d})   "
          f"interp {np.mean(interp):5.1f} (max {max(interp):2d})", flush=True)


def candidate_rows(context: int, queries: int) -> np.ndarray:
    from hisa.ops.indexer import naive as N
    from hisa.testing.inputs import make_indexer_inputs
    inp = make_indexer_inputs([context], query_lens=[queries], seed=2, clustered=True)
    pooled = N.naive_pool_blocks(inp.k, inp.k_scale, 128)
    ids = N.naive_select_blocks(N.naive_block_scores(inp.q, pooled, inp.weights, inp.ks,
                                                     inp.ke, block_size=128), 64)
    scores, _ = N.naive_token_scores(inp.q, inp.k, inp.weights, inp.ks, inp.ke, ids,
                                     block_size=128, k_scale=inp.k_scale)
    return scores.numpy()


def main() -> None:
    rng = np.random.default_rng(0)
    report("normal, 8,192 x k 2,048", rng.standard_normal((100, 8192)), 2048)
    report("squared normal", rng.standard_normal((100, 8192)) ** 2, 2048)
    report("log-normal (sigma 3)", np.exp(3 * rng.standard_normal((100, 8192))), 2048)
    report("normal, 1,024 x k 64, ends forced (blocks)", rng.standard_normal((100, 1024)), 64,
           forced=True, precount=False)
    report("normal, 8,192 x k 2,048, no precount (decode)",
           rng.standard_normal((100, 8192)), 2048, precount=False)
    for context in (16384, 65536):
        report(f"clustered candidates, {context // 1024}K context", candidate_rows(context, 32),
               2048)


if __name__ == "__main__":
    main()
