"""Issue 8, section 2, on the CPU paths: the cache's own query methods, the tiled sparse-attention
reference, and the smaller validation items. Each test fails on the code before its fix."""
import numpy as np
import pytest
import torch

import hisa
import hisa.ops.sparse_attn.naive as sparse_naive
from hisa.cache import PagedIndexerCache
from hisa.cache.factory import make_paged_inputs
from hisa.testing.inputs import make_exact_indexer_inputs, make_indexer_inputs


def test_cache_methods_carry_the_block_size_and_refuse_an_unpooled_cache():
    inp = make_paged_inputs([300, 129, 40], next_n=2, heads=4, head_dim=64, block_size=128)
    cache = inp.cache
    args = (inp.q, inp.weights, inp.seq_lens, inp.block_table)
    got = cache.hisa_index(*args, topk=64, block_topk=2, backend="torch")
    want = hisa.hisa_index_paged(*inp.hisa_args(), topk=64, block_size=128, block_topk=2,
                                 backend="torch")
    assert torch.equal(got, want)
    assert torch.equal(cache.dsa_index(*args, topk=64, backend="torch"),
                       hisa.dsa_index_paged(*inp.args(), topk=64, backend="torch"))
    flat = PagedIndexerCache(8, head_dim=64, block_size=128, pooled=False)
    assert flat.pooled_cache is None and not flat.pooled
    k = torch.randn(130, 64)
    pos = torch.arange(130)
    bt = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    flat.append(k, pos, pos, block_table=bt, req_indices=torch.zeros(130, dtype=torch.int32),
                backend="torch")
    lens = torch.tensor([130], dtype=torch.int32)
    q, w = torch.randn(1, 1, 4, 64), torch.randn(1, 4)
    with pytest.raises(ValueError, match="pooled=False"):
        flat.hisa_index(q, w, lens, bt, topk=8, block_topk=2)
    assert flat.dsa_index(q, w, lens, bt, topk=8, backend="torch").shape == (1, 8)
    wrapped = PagedIndexerCache.from_tensors(flat.kv_cache, None, head_dim=64, block_size=128)
    assert not wrapped.pooled


def test_a_new_cache_holds_the_unknown_sentinel_not_zeros():
    """A zero pooled row scores 0 and beats real blocks with negative scores; the sentinel
    scores NaN and ranks below every real block."""
    cache = PagedIndexerCache(4, head_dim=64, block_size=64)
    assert not bool(cache.pooled_cache[:, :64].any())
    assert bool(torch.isnan(cache.pooled_cache[:, 64:].view(torch.float32)).all())


def test_sparse_attention_reference_is_tiled(monkeypatch):
    g = torch.Generator().manual_seed(0)
    T, Hq, S, K, Dk, Dv = 37, 3, 90, 12, 16, 8
    q, k, v = torch.randn(T, Hq, Dk, generator=g), torch.randn(S, Dk, generator=g), \
        torch.randn(S, Dv, generator=g)
    idx = torch.randint(-1, 50, (T, K), generator=g, dtype=torch.int32)
    ks = torch.randint(0, 40, (T,), generator=g, dtype=torch.int32)
    whole = hisa.sparse_attention_reference(q, k, v, idx, ks)
    cap = 4 * K * (Dk + Dv + Hq) * 5                        # five queries a tile
    monkeypatch.setattr(sparse_naive, "NAIVE_TILE_BYTES", cap)
    rows = []
    tile_fn = sparse_naive._attend_tile

    def spy(q, *a):
        rows.append(q.shape[0])
        return tile_fn(q, *a)

    monkeypatch.setattr(sparse_naive, "_attend_tile", spy)
    tiled = hisa.sparse_attention_reference(q, k, v, idx, ks)
    assert rows == [5] * 7 + [2]
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)


def test_quantize_fp8_defaults_the_group_to_the_row_for_narrow_keys():
    x = torch.randn(5, 64)
    v, s = hisa.quantize_fp8(x)                              # group min(128, 64) = 64
    assert s.shape == (5,)
    torch.testing.assert_close(hisa.dequantize_fp8(v, s), x, rtol=0.07, atol=1e-2)
    assert hisa.quantize_fp8(torch.randn(2, 256))[1].shape == (2, 2)
    with pytest.raises(ValueError, match="multiple of group_size=128.*group_size=N"):
        hisa.quantize_fp8(torch.randn(2, 192))


def test_nan_key_quantizes_to_one_nan_byte_and_a_nan_scale():
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    x[2, 7] = -float("nan")
    v, s = hisa.quantize_fp8(x)
    assert torch.isnan(s[1:]).all() and not torch.isnan(s[0])
    assert bool((v[1:].view(torch.uint8) == 0x7F).all())


def test_append_head_dim_mismatch_blames_k():
    cache = PagedIndexerCache(2, head_dim=128, block_size=64)
    with pytest.raises(ValueError, match=r"k: expected head_dim 128 \(that of kv_cache"):
        cache.append(torch.randn(3, 64), torch.arange(3), torch.arange(3), backend="torch")
    inp = make_paged_inputs([70], heads=4, head_dim=64, block_size=64)
    with pytest.raises(ValueError, match=r"q: expected head_dim 64 \(that of kv_cache"):
        hisa.dsa_index_paged(torch.randn(1, 1, 4, 128), inp.cache.kv_cache, inp.weights,
                             inp.seq_lens, inp.block_table, backend="torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_is_a_value_error():
    with pytest.raises(ValueError, match="device: got 'cuda' but CUDA is not available"):
        PagedIndexerCache(4, head_dim=64, device="cuda")
    with pytest.raises(ValueError, match="device: expected a torch device"):
        PagedIndexerCache(4, head_dim=64, device="gpu0")


def test_integral_numpy_scalars_are_accepted_and_others_refused():
    inp = make_indexer_inputs([40], heads=2, head_dim=16, dtype=torch.float32)
    a = hisa.dsa_index(*inp.args(), topk=np.int64(8), backend="torch")
    assert torch.equal(a, hisa.dsa_index(*inp.args(), topk=8, backend="torch"))
    b = hisa.hisa_index(*inp.args(), topk=np.int32(8), block_size=np.int64(8),
                        block_topk=np.int16(2), backend="torch")
    assert torch.equal(b, hisa.hisa_index(*inp.args(), topk=8, block_size=8, block_topk=2,
                                          backend="torch"))
    cfg = hisa.HisaConfig(block_size=np.int64(64), block_topk=np.int64(32), topk=np.int64(2048))
    assert type(cfg.block_size) is int and cfg.candidates == 2048
    cache = PagedIndexerCache(np.int64(3), head_dim=np.int64(64), block_size=np.int64(64))
    assert cache.num_pages == 3 and type(cache.head_dim) is int
    assert hisa.quantize_fp8(torch.randn(2, 64), group_size=np.int64(32))[1].shape == (2, 2)
    for bad in (np.bool_(True), True, 8.0, torch.tensor(8)):
        with pytest.raises(TypeError, match="topk: expected an int"):
            hisa.dsa_index(*inp.args(), topk=bad, backend="torch")


def test_zero_heads_are_refused():
    q = torch.randn(4, 0, 16)
    k, w = torch.randn(4, 16), torch.randn(4, 0)
    ks, ke = hisa.windows_from_cu_seqlens(torch.tensor([0, 4], dtype=torch.int32))
    for op in (hisa.dsa_index, hisa.hisa_index):
        with pytest.raises(ValueError, match="q: expected at least one head"):
            op(q, k, w, ks, ke, topk=2, backend="torch")
    inp = make_paged_inputs([10], heads=4, head_dim=64, block_size=64)
    with pytest.raises(ValueError, match="q: expected at least one head"):
        hisa.dsa_index_paged(torch.randn(1, 1, 0, 64), inp.cache.kv_cache, torch.randn(1, 0),
                             inp.seq_lens, inp.block_table, backend="torch")


def test_k_scale_rule_is_one_for_prefill_and_append():
    """k_scale is the per-token scale of FP8 keys: required with them, refused otherwise."""
    inp = make_indexer_inputs([20], heads=2, head_dim=16, dtype=torch.float32)
    scale = torch.ones(20)
    msg = "k_scale: expected None because k is torch.float32"
    for op in (hisa.dsa_index, hisa.hisa_index):
        with pytest.raises(ValueError, match=msg):
            op(*inp.args(), k_scale=scale, topk=4, backend="torch")
    cache = PagedIndexerCache(2, head_dim=16, block_size=64)
    with pytest.raises(ValueError, match=msg):
        cache.append(inp.k, torch.arange(20), torch.arange(20), k_scale=scale, backend="torch")
    k8 = inp.k.to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"k_scale: expected a float32 \[S\]"):
        hisa.dsa_index(inp.q, k8, inp.weights, inp.ks, inp.ke, topk=4, backend="torch")
    with pytest.raises(ValueError, match=r"k_scale: expected a float32 \[T\]"):
        cache.append(k8, torch.arange(20), torch.arange(20), backend="torch")


def test_torch_append_refuses_duplicate_slots_and_foreign_rows():
    cache = PagedIndexerCache(2, head_dim=16, block_size=128)
    k = torch.randn(3, 16)
    with pytest.raises(ValueError, match=r"slot_mapping: expected distinct slots.*slot 5 for "
                                         r"tokens \[0, 2\]"):
        cache.append(k, torch.tensor([5, 6, 5]), torch.tensor([5, 6, 5]), backend="torch",
                     block_table=torch.zeros(1, 2, dtype=torch.int32),
                     req_indices=torch.zeros(3, dtype=torch.int32))
    cache.append(k, torch.tensor([-1, 6, -1]), torch.tensor([0, 6, 0]), backend="torch",
                 block_table=torch.zeros(1, 2, dtype=torch.int32),
                 req_indices=torch.zeros(3, dtype=torch.int32))    # padding may repeat
    kb = torch.randn(128, 16)
    pos = torch.arange(128)
    with pytest.raises(ValueError, match=r"req_indices: expected rows in \[0, 1\)"):
        cache.append(kb, pos, pos, backend="torch", block_table=torch.tensor([[0, 1]],
                                                                            dtype=torch.int32),
                     req_indices=torch.full((128,), 3, dtype=torch.int32))


def test_exact_inputs_make_scores_exact():
    """The factory's claim: fp32 scores equal the float64 ones exactly."""
    from hisa.ops.dsa.naive import naive_dsa_logits
    for dtype in (torch.float32, torch.float8_e4m3fn):
        inp = make_exact_indexer_inputs([50], heads=16, head_dim=64, dtype=dtype, seed=1)
        got = naive_dsa_logits(*inp.args(), k_scale=inp.k_scale)
        q, k, w = inp.q.double(), inp.k.double(), inp.weights.double()
        ref = torch.einsum("th,ths->ts", w, torch.einsum("thd,sd->ths", q, k).clamp_min(0))
        if inp.k_scale is not None:
            ref = ref * inp.k_scale.double()
        inside = torch.arange(50)[None, :] < inp.ke[:, None]
        assert torch.equal(got[inside].double(), ref[inside])
    paged = make_paged_inputs([200], heads=16, head_dim=64, block_size=64, exact=True,
                              q_dtype=torch.float32)
    k, s = paged.keys[0]
    assert bool((s == torch.exp2(torch.log2(s).round())).all())    # power-of-two scales
