import pytest
import torch

from hisa import windows_from_cu_seqlens


def brute_windows(q_lens, k_lens):
    ks, ke, kstart = [], [], 0
    for ql, kl in zip(q_lens, k_lens):
        for i in range(ql):
            ks.append(kstart)
            ke.append(kstart + kl - ql + i + 1)
        kstart += kl
    return ks, ke


@pytest.mark.parametrize("q_lens,k_lens", [
    ([3, 2], None), ([0, 5, 1], None), ([1], [100]), ([4, 0, 3], [10, 7, 3]), ([], []),
])
def test_windows_match_brute_force(q_lens, k_lens):
    cq = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    ck = None if k_lens is None else torch.tensor([0] + k_lens).cumsum(0).to(torch.int32)
    ks, ke = windows_from_cu_seqlens(cq, ck)
    eks, eke = brute_windows(q_lens, q_lens if k_lens is None else k_lens)
    assert ks.dtype == torch.int32 and ks.tolist() == eks and ke.tolist() == eke


def test_errors():
    with pytest.raises(ValueError, match="cu_seqlens_q: expected non-decreasing"):
        windows_from_cu_seqlens(torch.tensor([0, 5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected k_len >= q_len"):
        windows_from_cu_seqlens(torch.tensor([0, 5], dtype=torch.int32),
                                torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected 2 entries"):
        windows_from_cu_seqlens(torch.tensor([0, 5], dtype=torch.int32),
                                torch.tensor([0, 3, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        windows_from_cu_seqlens(torch.tensor([0.0, 5.0]))
