import pytest
import torch

import hisa


def dense_causal(q, k, v, ks, ke):
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[1])
    for t in range(q.shape[0]):
        a, b = int(ks[t]), int(ke[t])
        if b > a:
            p = torch.softmax(q[t] @ k[a:b].T / q.shape[-1] ** 0.5, dim=-1)
            out[t] = p @ v[a:b]
    return out


def test_selecting_every_key_equals_dense_attention():
    T, H, D = 40, 3, 16
    q, k, v = torch.randn(T, H, D), torch.randn(T, D), torch.randn(T, 8)
    ks, ke = hisa.windows_from_cu_seqlens(torch.tensor([0, 15, 40], dtype=torch.int32))
    idx = hisa.dsa_index(torch.randn(T, 2, D), k, torch.rand(T, 2), ks, ke, topk=64,
                         backend="torch")
    torch.testing.assert_close(hisa.sparse_attention_reference(q, k, v, idx, ks),
                               dense_causal(q, k, v, ks, ke))


def test_padding_ignored_and_empty_rows_zero():
    q, k, v = torch.randn(2, 1, 4), torch.randn(5, 4), torch.randn(5, 3)
    idx = torch.tensor([[2, -1, -1], [-1, -1, -1]], dtype=torch.int32)
    ks = torch.tensor([1, 0], dtype=torch.int32)
    out = hisa.sparse_attention_reference(q, k, v, idx, ks)
    torch.testing.assert_close(out[0, 0], v[3])          # one key: softmax weight 1
    assert torch.equal(out[1], torch.zeros(1, 3))
    assert not torch.isnan(out).any()


def test_out_of_range_index_rejected():
    q, k, v = torch.randn(1, 1, 4), torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(ValueError, match="indices"):
        hisa.sparse_attention_reference(q, k, v, torch.tensor([[7]], dtype=torch.int32),
                                        torch.tensor([0], dtype=torch.int32))
