"""Checks of the output contract and tie-tolerant comparison of selections."""
from __future__ import annotations

import torch

#: Scores of two implementations of the same selection are compared with this relative slack
#: when deciding whether a differing entry is a tie at the k-th score (fp32 sums of 128-wide
#: dot products in different orders differ by a few ulps; FP8 inputs make exact ties common).
TIE_RTOL = 1e-5


def canonical_rows(idx: torch.Tensor) -> torch.Tensor:
    """int32 index rows sorted ascending with the -1 padding last, on idx's device: two
    selections of the same sets compare equal however each orders its valid entries (the
    contract leaves that order free)."""
    big = torch.iinfo(torch.int32).max
    return torch.sort(idx.masked_fill(idx < 0, big), dim=1).values


def check_index_format(idx: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int, *,
                       exact_count: bool = True) -> None:
    """Assert the output format of contract section 2 row by row (raises AssertionError).

    A window of at most ``topk`` keys must come back whole. Longer windows must fill all
    ``topk`` slots when ``exact_count`` (flat DSA); HISA may find fewer candidates than
    ``topk`` inside its kept blocks, so it passes ``exact_count=False``.
    """
    assert idx.dtype == torch.int32, idx.dtype
    assert idx.shape == (ks.shape[0], topk), (idx.shape, ks.shape[0], topk)
    idx, lens = idx.long().cpu(), (ke.long() - ks.long()).cpu()
    valid = idx >= 0
    count = valid.sum(1)
    expected = lens.clamp(max=topk)
    wrong = count != expected
    if not exact_count:
        wrong &= (lens <= topk) | (count < 1)
    bad = wrong.nonzero()
    assert bad.numel() == 0, f"row {int(bad[0])}: {int(count[bad[0]])} valid, expected " \
                             f"{int(expected[bad[0]])}"
    # Valid entries first, then -1s: a row's valid mask must be non-increasing.
    assert bool((valid[:, 1:] <= valid[:, :-1]).all()), "a -1 precedes a valid entry"
    assert bool((idx[valid] < lens.unsqueeze(1).expand_as(idx)[valid]).all()), "index >= window"
    assert bool(((idx == -1) | valid).all()), "index below -1"
    srt = torch.sort(idx.masked_fill(~valid, -1), dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    assert not bool(dup.any()), f"duplicate index in row {int(dup.any(1).nonzero()[0])}"


def selected_scores(idx: torch.Tensor, ks: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Gather full-row logits [T, S] at selected offsets; -inf at -1 slots."""
    pos = (idx.long() + ks.long().unsqueeze(1)).clamp_min(0)
    vals = torch.gather(logits, 1, pos)
    return vals.masked_fill(idx < 0, float("-inf"))


#: FP8 tensor-core products on Hopper accumulate at reduced precision: kernel scores differ
#: from the fp32 reference by up to about 1e-3 of the row's largest |score| (cancellations make
#: relative error meaningless). Selections are compared with this slack, as a fraction of it.
FP8_MMA_ROW_TOL = 2e-3


def assert_same_selection(idx_a: torch.Tensor, idx_b: torch.Tensor, ks: torch.Tensor,
                          logits: torch.Tensor, *, rtol: float = TIE_RTOL,
                          row_tol: float = 0.0) -> None:
    """Two selections agree up to ties: same valid count per row, and every entry that only one
    of them holds scores within ``rtol * |k-th| + row_tol * max|row|`` of the row's k-th
    (smallest selected) score, scores taken from the reference ``logits``."""
    a, b = idx_a.long().cpu(), idx_b.long().cpu()
    assert bool(((a >= 0).sum(1) == (b >= 0).sum(1)).all()), "valid counts differ"
    va, vb = selected_scores(a, ks.cpu(), logits.cpu()), selected_scores(b, ks.cpu(), logits.cpu())
    for t in range(a.shape[0]):
        sa, sb = set(a[t][a[t] >= 0].tolist()), set(b[t][b[t] >= 0].tolist())
        if sa == sb:
            continue
        kth = min(va[t][a[t] >= 0].min(), vb[t][b[t] >= 0].min()).item()
        row = logits[t][torch.isfinite(logits[t])]
        slack = row_tol * (row.abs().max().item() if row.numel() else 0.0)
        only = [(x, va[t][a[t] == x]) for x in sa - sb] + [(x, vb[t][b[t] == x]) for x in sb - sa]
        for x, v in only:
            v = v.item()
            assert abs(v - kth) <= rtol * max(abs(kth), 1e-30) + slack + 1e-30, \
                f"row {t}: offset {x} (score {v}) selected by one side only; k-th score {kth}"


#: One FP8 (e4m3) step relative to a value: three mantissa bits.
FP8_STEP_RTOL = 2.0 ** -3


def assert_pooled_rows_close(got: torch.Tensor, want: torch.Tensor, head_dim: int) -> None:
    """Assert two pooled (or super-block) caches, uint8 [P, D + 4], hold the same rows up to
    one FP8 step: the same rows unknown (NaN scale), and every known row's scale and
    dequantized values within :data:`FP8_STEP_RTOL` (plus a floor of 2^-8 of the largest
    scale for values near zero). Means of rows that are themselves rounded (a super-block
    averages FP8 block rows with plain fp32 scales) are sums whose order changes the last bit,
    and a quantization at a rounding boundary then moves one FP8 step: byte equality holds
    only for exact means (keys with power-of-two scales at the block level)."""
    from hisa.cache.layout import pooled_views
    (va, sa), (vb, sb) = pooled_views(got, head_dim), pooled_views(want, head_dim)
    assert torch.equal(torch.isnan(sa), torch.isnan(sb)), "different rows are unknown"
    torch.testing.assert_close(sa, sb, rtol=FP8_STEP_RTOL, atol=0, equal_nan=True)
    known = ~torch.isnan(sb)
    if bool(known.any()):
        fa = va.contiguous().view(torch.float8_e4m3fn).float() * sa[:, None]
        fb = vb.contiguous().view(torch.float8_e4m3fn).float() * sb[:, None]
        torch.testing.assert_close(fa[known], fb[known], rtol=FP8_STEP_RTOL,
                                   atol=float(sb[known].max()) * 2 ** -8)
