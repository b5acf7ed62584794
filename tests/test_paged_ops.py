"""dsa_index_paged / hisa_index_paged references: agreement with the packed references,
next_n = 2, awkward lengths, use of the pooled cache, and every validation error (CPU)."""
import pytest
import torch

import hisa
from hisa.cache.factory import make_paged_inputs
from hisa.ops.dsa.naive import naive_dsa_index, naive_dsa_logits
from hisa.ops.indexer.naive import naive_hisa_index, naive_pool_blocks
from hisa.testing.compare import assert_same_selection, check_index_format

H = 8
TOPK = 64
B, M = 64, 4            # m * B = 256 candidates: real pruning above 256 keys

# Lengths chosen to hit: empty, 1 key, < topk, < B, exact 64 and B multiples, one past them,
# >> m * B (real pruning).
LENGTHS = [0, 1, 50, 64, 65, 128, 129, 256, 300, 777, 1024]


def packed_windows(inp):
    """The same requests as one packed key buffer: (k, k_scale, ks, ke) for the packed refs."""
    k = torch.cat([kk for kk, _ in inp.keys])
    s = torch.cat([ss for _, ss in inp.keys])
    starts = torch.tensor([0] + [kk.shape[0] for kk, _ in inp.keys]).cumsum(0)[:-1]
    starts = starts.repeat_interleave(inp.next_n)
    lens = inp.row_lengths()
    return k, s, starts.to(torch.int32), (starts + lens).to(torch.int32)


@pytest.mark.parametrize("next_n,two_d", [(1, False), (2, False), (2, True)])
def test_dsa_paged_matches_packed(next_n, two_d):
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, block_size=B, seq_lens_2d=two_d)
    idx, sc = hisa.dsa_index_paged(*inp.args(), topk=TOPK, return_scores=True, backend="torch")
    k, s, ks, ke = packed_windows(inp)
    q = inp.q.flatten(0, 1)
    ref, _ = naive_dsa_index(q, k, inp.weights, ks, ke, k_scale=s, topk=TOPK)
    check_index_format(idx, torch.zeros_like(ke), ke - ks, TOPK)
    assert_same_selection(idx, ref, ks, naive_dsa_logits(q, k, inp.weights, ks, ke, k_scale=s))
    assert bool((sc[idx < 0] == float("-inf")).all()) and bool(torch.isfinite(sc[idx >= 0]).all())


def test_next_n_two_rows_see_one_more_key_each():
    inp = make_paged_inputs([40, 200], next_n=2, heads=H, block_size=B)
    idx = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    assert (idx[0] >= 0).sum() == 39 and (idx[1] >= 0).sum() == 40
    assert int(idx[0].max()) == 38 and int(idx[1].max()) == 39
    assert int(idx[2:].max()) <= 199


def test_one_d_and_two_d_seq_lens_agree():
    a = make_paged_inputs([300, 129], next_n=2, heads=H, block_size=B)
    b = make_paged_inputs([300, 129], next_n=2, heads=H, block_size=B, seq_lens_2d=True)
    for fn in (lambda x: hisa.dsa_index_paged(*x.args(), topk=TOPK, backend="torch"),
               lambda x: hisa.hisa_index_paged(*x.hisa_args(), topk=TOPK, block_size=B,
                                               block_topk=M, backend="torch")):
        assert torch.equal(fn(a), fn(b))


def scratch_pooled(k, s, block_size):
    """Pooling from scratch (every block, tail included), quantized like the cache does."""
    v, sc = hisa.quantize_fp8(naive_pool_blocks(k, s, block_size), group_size=k.shape[1])
    return v, sc


@pytest.mark.parametrize("block_size,next_n", [(64, 1), (128, 2), (256, 1)])
def test_hisa_paged_matches_packed_with_scratch_pooling(block_size, next_n):
    m = max(2, 256 // block_size)
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, block_size=block_size)
    idx, sc = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=block_size,
                                    block_topk=m, return_scores=True, backend="torch")
    lens = inp.row_lengths()
    check_index_format(idx, torch.zeros_like(lens), lens, TOPK)
    for b, (k, s) in enumerate(inp.keys):
        if k.shape[0] == 0:
            assert bool((idx[b * next_n:(b + 1) * next_n] == -1).all())
            continue
        rows = slice(b * next_n, (b + 1) * next_n)
        pv, ps = scratch_pooled(k, s, block_size)
        ref, ref_sc = naive_hisa_index(inp.q[b], k, inp.weights[rows], torch.zeros(
            next_n, dtype=torch.int32), lens[rows].to(torch.int32), k_scale=s, topk=TOPK,
            block_size=block_size, block_topk=m, pooled=pv, pooled_scale=ps)
        assert torch.equal(idx[rows], ref), f"request {b} (length {LENGTHS[b]})"
        assert torch.equal(sc[rows], ref_sc)


@pytest.mark.parametrize("next_n", [1, 2])
def test_hisa_paged_equals_dsa_paged_when_all_blocks_fit(next_n):
    # m * B = 16 * 64 = 1024 >= every length: HISA keeps every block, so it is exact.
    inp = make_paged_inputs(LENGTHS, next_n=next_n, heads=H, block_size=64)
    h = hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=64, block_topk=16,
                              backend="torch")
    d = hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch")
    assert torch.equal(h, d)


def test_hisa_paged_prunes_beyond_m_blocks():
    inp = make_paged_inputs([4096], heads=H, block_size=64, seed=7)
    # topk = m * B: every candidate token is returned, so the kept blocks are visible.
    h = hisa.hisa_index_paged(*inp.hisa_args(), topk=256, block_size=64, block_topk=4,
                              backend="torch")
    assert int((h >= 0).sum()) == 256
    blocks = set((h[h >= 0] // 64).tolist())
    assert len(blocks) == 4 and {0, 63} <= blocks            # forced sink and tail blocks


def test_hisa_paged_reads_the_pooled_cache():
    """Poisoning one complete block's pooled row makes it win stage 1: the op uses the
    cache rather than re-pooling."""
    inp = make_paged_inputs([1024], heads=H, block_size=64, seed=3)
    args = dict(topk=256, block_size=64, block_topk=4, backend="torch")   # topk = m * B
    before = hisa.hisa_index_paged(*inp.hisa_args(), **args)
    chosen = set((before[before >= 0] // 64).tolist())
    target = next(j for j in range(1, 15) if j not in chosen)
    page = int(inp.block_table[0, target])
    # A representative aligned with the weighted queries scores far above any real block.
    direction = (inp.weights[0].unsqueeze(1) * inp.q[0, 0].float()).sum(0)
    v, s = hisa.quantize_fp8(1e3 * direction.unsqueeze(0), group_size=128)
    inp.cache.pooled_cache[page, :128] = v[0].view(torch.uint8)
    inp.cache.pooled_cache[page, 128:] = s.view(torch.uint8)
    after = hisa.hisa_index_paged(*inp.hisa_args(), **args)
    assert target in set((after[after >= 0] // 64).tolist())


def test_tail_pooled_row_is_never_read():
    """The incomplete tail block is forced: garbage in its page's pooled row changes nothing."""
    inp = make_paged_inputs([700], heads=H, block_size=128, seed=2)
    args = dict(topk=TOPK, block_size=128, block_topk=2, backend="torch")
    before = hisa.hisa_index_paged(*inp.hisa_args(), **args)
    tail_page = int(inp.block_table[0, 700 // 64])
    inp.cache.pooled_cache[tail_page] = 255                      # NaN bits
    assert torch.equal(hisa.hisa_index_paged(*inp.hisa_args(), **args), before)


def test_out_buffer_and_scores():
    inp = make_paged_inputs([300, 5], next_n=2, heads=H, block_size=B)
    out = torch.full((4, TOPK), 7, dtype=torch.int32)
    for fn in (lambda **kw: hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch", **kw),
               lambda **kw: hisa.hisa_index_paged(*inp.hisa_args(), topk=TOPK, block_size=B,
                                                  block_topk=M, backend="torch", **kw)):
        ref = fn()
        got, sc = fn(out=out, return_scores=True)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, ref)
        assert sc.shape == (4, TOPK) and sc.dtype == torch.float32


def test_deepgemm_4d_cache_view_accepted():
    inp = make_paged_inputs([200], heads=H, block_size=B)
    kv4 = inp.cache.kv_cache.view(-1, 64, 1, 132)
    a = hisa.dsa_index_paged(inp.q, kv4, inp.weights, inp.seq_lens, inp.block_table, topk=TOPK,
                             backend="torch")
    assert torch.equal(a, hisa.dsa_index_paged(*inp.args(), topk=TOPK, backend="torch"))


# --- validation ---------------------------------------------------------------------------

def _paged_args():
    inp = make_paged_inputs([130, 70], next_n=1, heads=H, block_size=B)
    return dict(q=inp.q, kv_cache=inp.cache.kv_cache, pooled_cache=inp.cache.pooled_cache,
                weights=inp.weights, seq_lens=inp.seq_lens, block_table=inp.block_table)


def _call(op, a, **kw):
    if op == "dsa":
        return hisa.dsa_index_paged(a["q"], a["kv_cache"], a["weights"], a["seq_lens"],
                                    a["block_table"], topk=kw.pop("topk", TOPK),
                                    backend="torch", **kw)
    return hisa.hisa_index_paged(a["q"], a["kv_cache"], a["pooled_cache"], a["weights"],
                                 a["seq_lens"], a["block_table"], topk=kw.pop("topk", TOPK),
                                 block_size=kw.pop("block_size", B),
                                 block_topk=kw.pop("block_topk", M), backend="torch", **kw)


BAD = [
    ("q", lambda a: a["q"].flatten(0, 1), ValueError),
    ("q", lambda a: a["q"].view(torch.uint8), TypeError),
    ("q", lambda a: a["q"].float().expand(2, 3, H, 128).contiguous(), ValueError),   # next_n 3
    ("kv_cache", lambda a: a["kv_cache"].float(), TypeError),
    ("kv_cache", lambda a: a["kv_cache"][:, :-4], ValueError),
    ("weights", lambda a: a["weights"][:1], ValueError),
    ("weights", lambda a: a["weights"].double(), TypeError),
    ("seq_lens", lambda a: a["seq_lens"].long(), TypeError),
    ("seq_lens", lambda a: a["seq_lens"][:1], ValueError),
    ("seq_lens", lambda a: a["seq_lens"].unsqueeze(1).expand(2, 3).contiguous(), ValueError),
    ("seq_lens", lambda a: a["seq_lens"] - 200, ValueError),               # negative
    ("seq_lens", lambda a: a["seq_lens"] * 100, ValueError),               # beyond the table
    ("block_table", lambda a: a["block_table"].long(), TypeError),
    ("block_table", lambda a: a["block_table"][:1], ValueError),
    ("block_table", lambda a: a["block_table"] + 1000, ValueError),        # page ids out of range
]


@pytest.mark.parametrize("op", ["dsa", "hisa"])
@pytest.mark.parametrize("name,make,exc", BAD)
def test_paged_validation(op, name, make, exc):
    a = _paged_args()
    a[name] = make(a)
    with pytest.raises(exc, match=name):
        _call(op, a)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(topk=0), ValueError, "topk"),
    (dict(out=torch.zeros(2, TOPK, dtype=torch.int64)), TypeError, "out"),
    (dict(out=torch.zeros(3, TOPK, dtype=torch.int32)), ValueError, "out"),
])
@pytest.mark.parametrize("op", ["dsa", "hisa"])
def test_paged_option_validation(op, kw, exc, name):
    with pytest.raises(exc, match=name):
        _call(op, _paged_args(), **kw)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(block_size=96, block_topk=8), ValueError, "block_size"),
    (dict(block_topk=1), ValueError, "block_topk"),
    (dict(block_topk=2, topk=256), ValueError, "block_topk"),              # m * B < topk
])
def test_hisa_paged_param_validation(kw, exc, name):
    with pytest.raises(exc, match=name):
        _call("hisa", _paged_args(), **kw)


def test_hisa_paged_pooled_cache_validation():
    a = _paged_args()
    a["pooled_cache"] = a["pooled_cache"][:-1]
    with pytest.raises(ValueError, match="pooled_cache"):
        _call("hisa", a)
    a = _paged_args()
    a["pooled_cache"] = a["pooled_cache"].float()
    with pytest.raises(TypeError, match="pooled_cache"):
        _call("hisa", a)
