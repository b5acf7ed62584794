"""The NaN / Inf selection rule in every Triton selection (interpreter), against the torch
references: NaN / Inf in q, k, k_scale and weights, prefill and decode, and the wide-row top-k
paths (register row, sampled threshold, histogram, tie fallback, decode chunk merge).

Inputs are integer-valued (exact scores in any summation order), so the kernels and the
references must select identical sets, NaN ties included; poisoned outputs catch unwritten
slots."""
import pytest
import torch

import hisa
import hisa.ops.dsa.decode_kernels as dk
from hisa.cache import page_views
from hisa.cache.factory import make_paged_inputs
from hisa.cache.layout import mark_pooled_unknown
from hisa.ops.dsa.naive import mark_outside, naive_topk
from hisa.ops.indexer import topk as topk_mod
from hisa.testing.compare import canonical_rows, check_index_format
from hisa.testing.inputs import make_exact_indexer_inputs

from test_nan_rule import CASES, IDS, INF, NAN, inject

POISON = -7


def run(op, *args, backend, **kw):
    topk = kw["topk"]
    out = torch.full((args[0].shape[0] * (args[0].shape[1] if args[0].dim() == 4 else 1),
                      topk), POISON, dtype=torch.int32)
    return op(*args, out=out, backend=backend, **kw)


#: A subset of the reference test's cases (the rule lives in shared helpers; each pipeline
#: stage meets NaN and both infinities, in fp32 and fp8): the interpreter is slow.
KERNEL_CASES = [("q", NAN, torch.float32), ("k", INF, torch.float32),
                ("k", NAN, torch.float8_e4m3fn), ("k_scale", INF, torch.float8_e4m3fn),
                ("weights", NAN, torch.float32), ("weights", -INF, torch.float8_e4m3fn)]


@pytest.mark.parametrize("where,value,dtype", KERNEL_CASES,
                         ids=[IDS[CASES.index(c)] for c in KERNEL_CASES])
def test_prefill_kernels_follow_the_rule(where, value, dtype):
    # The last queries of each sequence (a chunked prefill): long windows, few programs.
    inp = inject(make_exact_indexer_inputs([40, 13, 70], heads=16, head_dim=64, dtype=dtype,
                                           query_lens=[6, 3, 9], seed=1), where, value, seed=2)
    kw = dict(k_scale=inp.k_scale, topk=24)
    got = run(hisa.dsa_index, *inp.args(), backend="triton", **kw)
    want = hisa.dsa_index(*inp.args(), backend="torch", **kw)
    check_index_format(got, inp.ks, inp.ke, 24)
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    # every block kept: HISA's kernels give the flat set
    got = run(hisa.hisa_index, *inp.args(), backend="triton", block_size=16, block_topk=8, **kw)
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    if dtype == torch.float32:      # fp32 means pool exactly: the pruned selections agree too
        kw.update(block_size=16, block_topk=2)
        got = run(hisa.hisa_index, *inp.args(), backend="triton", **kw)
        want = hisa.hisa_index(*inp.args(), backend="torch", **kw)
        assert torch.equal(canonical_rows(got), canonical_rows(want))


@pytest.mark.parametrize("where,value,dtype", KERNEL_CASES,
                         ids=[IDS[CASES.index(c)] for c in KERNEL_CASES])
def test_three_level_prefill_kernels_follow_the_rule(where, value, dtype):
    inp = inject(make_exact_indexer_inputs([40, 13, 70], heads=16, head_dim=64, dtype=dtype,
                                           query_lens=[6, 3, 9], seed=1), where, value, seed=2)
    kw = dict(k_scale=inp.k_scale, topk=24)
    want = hisa.dsa_index(*inp.args(), backend="torch", **kw)
    # every block and super-block kept (<= 70 keys: <= 6 blocks of 16, <= 4 super-blocks of
    # 32): the three-level kernels give the flat set
    got = run(hisa.hisa_index, *inp.args(), backend="triton", block_size=16, block_topk=8,
              super_size=2, super_topk=4, **kw)
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    if dtype == torch.float32:      # exact fp32 means: pruning at both levels agrees too
        kw.update(block_size=16, block_topk=2, super_size=2, super_topk=2)
        got = run(hisa.hisa_index, *inp.args(), backend="triton", **kw)
        check_index_format(got, inp.ks, inp.ke, 24, exact_count=False)
        want = hisa.hisa_index(*inp.args(), backend="torch", **kw)
        assert torch.equal(canonical_rows(got), canonical_rows(want))


DECODE_CASES = ["q_nan", "w_inf", "w_neg_inf", "key_nan", "scale_nan", "scale_zero"]


def decode_inputs(case, lengths=(300, 1, 64, 129), super_size=None):
    inp = make_paged_inputs(list(lengths), next_n=2, heads=16, head_dim=64, block_size=64,
                            super_size=super_size, exact=True, q_dtype=torch.float32, seed=3)
    values, scales = page_views(inp.cache.kv_cache, 64)
    page = int(inp.block_table[0, 2])                        # tokens 128..191 of request 0
    if case == "q_nan":
        inp.q[0, 1, 3, 5] = NAN
    elif case == "q_inf":
        inp.q[0, 0, 2, 7] = INF
    elif case.startswith("w_"):
        inp.weights[[0, 2, 5], [1, 4, 9]] = {"w_nan": NAN, "w_inf": INF, "w_neg_inf": -INF}[case]
    elif case == "key_nan":
        values[page, [3, 40]] = 0x7F                          # two all-NaN FP8 keys
    elif case == "super_unknown":                             # request 0's super-block 1
        mark_pooled_unknown(inp.cache.super_cache, inp.block_table[0, 3:4])
    elif case == "block_unknown":                             # request 0's block 3
        mark_pooled_unknown(inp.cache.pooled_cache, inp.block_table[0, 3:4])
    else:
        scales[page, [5, 6, 7]] = {"scale_nan": NAN, "scale_inf": INF, "scale_zero": 0.0}[case]
    return inp


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_kernels_follow_the_rule(case):
    inp = decode_inputs(case)
    lens = inp.row_lengths()
    got = run(hisa.dsa_index_paged, *inp.args(), topk=40, backend="triton")
    want = hisa.dsa_index_paged(*inp.args(), topk=40, backend="torch")
    check_index_format(got, torch.zeros_like(lens), lens, 40)
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    # HISA with m = 8 (every block of these requests kept): the flat set again
    got = run(hisa.hisa_index_paged, *inp.hisa_args(), topk=40, block_size=64, block_topk=8,
              backend="triton")
    assert torch.equal(canonical_rows(got), canonical_rows(want))


@pytest.mark.parametrize("case", ["q_nan", "w_inf", "key_nan", "scale_nan", "super_unknown",
                                  "block_unknown"])
def test_three_level_decode_kernels_follow_the_rule(case):
    # Request 0: 700 keys, 11 blocks of 64, 6 super-blocks of 128.
    inp = decode_inputs(case, lengths=(700, 1, 64, 300), super_size=2)
    lens = inp.row_lengths()
    want = hisa.dsa_index_paged(*inp.args(), topk=40, backend="torch")
    # m = 11 blocks, ms = 6 super-blocks: everything kept, the flat set
    got = run(hisa.hisa_index_paged, *inp.hisa_args(), topk=40, block_size=64, block_topk=11,
              backend="triton", **inp.super_kwargs(6))
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    # Pruning at both levels: the kernels read the same cached rows as the reference
    # (exact inputs: bit-identical scores), so the selections are identical.
    kw = dict(topk=40, block_size=64, block_topk=3, **inp.super_kwargs(3))
    got = run(hisa.hisa_index_paged, *inp.hisa_args(), backend="triton", **kw)
    check_index_format(got, torch.zeros_like(lens), lens, 40, exact_count=False)
    assert torch.equal(canonical_rows(got), canonical_rows(hisa.hisa_index_paged(*inp.hisa_args(),
                                                               backend="torch", **kw)))
    unknown = {"super_unknown": range(128, 256), "block_unknown": range(192, 256)}.get(case)
    if unknown is not None:         # an unknown row ranks below every real one: never kept
        assert not set(got[:2].flatten().tolist()) & set(unknown)


def test_topk_rows_paths_follow_the_rule(monkeypatch):
    """Each path of topk_rows on rows with NaN, +-inf and outside-marked entries."""
    g = torch.Generator().manual_seed(5)
    R, W, k = 6, 700, 32
    x = torch.randint(-3, 4, (R, W), generator=g).float()
    x[0, ::3] = NAN                                  # NaN among finite ties (sampled path)
    x[1] = NAN                                       # all NaN: massive ties in the NaN bin
    x[1, 600] = -INF
    x[2, 100:] = NAN                                 # fewer than k numbers: NaN fills the rest
    x[2, :90] = -INF
    x[3, 5:10] = INF
    mark_outside(x[4], torch.arange(W) % 2 == 0)     # outside entries inside a row (decode)
    x[4, 1::4] = NAN
    x[5] = -INF
    x[5, 10:] = NAN                                  # register row: 10 -inf, then NaN fills
    ks = torch.zeros(R, dtype=torch.int32)
    ke = torch.tensor([300, 700, 700, 700, 700, 120], dtype=torch.int32)
    monkeypatch.setattr(topk_mod, "TOPK_CHUNK", 256)
    monkeypatch.setattr(topk_mod, "TOPK_SCRATCH", 128)
    monkeypatch.setattr(topk_mod, "TOPK_SAMPLE", 64)
    idx = torch.full((R, k), POISON, dtype=torch.int32)
    val = torch.full((R, k), 7.0)
    topk_mod.topk_rows(x, ks, ke, t0=0, lo=0, topk=k, out_idx=idx, out_val=val)
    for r in range(R):
        ref, ref_val = naive_topk(x[r:r + 1, :int(ke[r])], k)
        assert sorted(idx[r].tolist()) == sorted(ref[0].tolist()), r
        n = int((ref >= 0).sum())
        torch.testing.assert_close(val[r, :n].sort().values, ref_val[0, :n].sort().values,
                                   equal_nan=True)
    # A NaN score comes back as the positive quiet NaN: a negative one sorts below -inf in a
    # radix sort (torch.sort on CUDA), so the values would not sort like the reference's.
    nan = torch.isnan(val)
    assert bool(nan.any())
    assert bool((val.view(torch.int32)[nan] == 0x7FC00000).all())


def test_decode_chunked_topk_follows_the_rule(monkeypatch):
    monkeypatch.setattr(dk, "TOPK_CHUNK", 64)       # 300 keys: 5 chunks, then the merge
    inp = decode_inputs("w_nan")
    inp.weights[0] = NAN                            # request 0, row 0: all NaN
    got = run(hisa.dsa_index_paged, *inp.args(), topk=40, backend="triton")
    want = hisa.dsa_index_paged(*inp.args(), topk=40, backend="torch")
    assert torch.equal(canonical_rows(got), canonical_rows(want))
    assert sorted(got[0].tolist()) == list(range(40))
