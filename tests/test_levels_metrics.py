"""The super-block oracle bound of the fidelity study (CPU)."""
import pytest
import torch

import hisa
from hisa.eval.levels import multiscale_keys, super_oracle_recall
from hisa.eval.metrics import selection_mask
from hisa.testing.inputs import make_indexer_inputs


def test_oracle_holds_forced_then_fullest_super_blocks():
    # B = 2, Bs = 2: super-blocks of 4 keys. Offsets 0 | 5 6 | 9 | 13 14 15 -> counts 1 2 1 3.
    idx = torch.tensor([[0, 5, 6, 9, 13, 14, 15, -1]], dtype=torch.int32)
    ks, ke = torch.tensor([0], dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    got = lambda ms: float(super_oracle_recall(idx, ks, ke, block_size=2, super_size=2,  # noqa
                                               super_topk=ms)[0])
    assert got(2) == pytest.approx(4 / 7) and got(3) == pytest.approx(6 / 7)
    assert got(4) == 1.0 and got(9) == 1.0
    # Offsets are relative to ks: the same keys seen from ks = 4 move one super-block on.
    shifted = super_oracle_recall(torch.tensor([[1, 2, 5, 9, 10, 11, -1, -1]],
                                               dtype=torch.int32), torch.tensor(
        [4], dtype=torch.int32), torch.tensor([16], dtype=torch.int32), block_size=2,
        super_size=2, super_topk=2)
    assert float(shifted[0]) == pytest.approx(5 / 6)       # forced: super-blocks 1 and 3
    empty = super_oracle_recall(torch.full((1, 4), -1, dtype=torch.int32), ks, ke,
                                block_size=2, super_size=2, super_topk=2)
    assert torch.isnan(empty).all()


def test_three_level_recall_never_beats_the_oracle():
    inp = make_indexer_inputs([3000], query_lens=[40], heads=4, head_dim=32,
                              dtype=torch.float32, seed=3, clustered=True)
    kw = dict(topk=64, block_size=16, block_topk=8, backend="torch")
    two = hisa.hisa_index(*inp.args(), **kw)
    for ms in (2, 3, 6):
        three = hisa.hisa_index(*inp.args(), super_size=4, super_topk=ms, **kw)
        w = int(inp.ke.max())
        m2, m3 = selection_mask(two, w), selection_mask(three, w)
        recall = (m2 & m3).sum(1).float() / m2.sum(1).float()
        bound = super_oracle_recall(two, inp.ks, inp.ke, block_size=16, super_size=4,
                                    super_topk=ms)
        assert bool((recall <= bound + 1e-6).all())
        assert float(bound.mean()) < 1.0 or ms == 6


def test_multiscale_keys_shape_and_structure():
    g = torch.Generator().manual_seed(0)
    k = multiscale_keys(70000, 16, generator=g, device="cpu")
    assert k.shape == (70000, 16)
    # Keys 40K apart share no drift; keys 100 apart (same 256-run) share all three.
    near = torch.nn.functional.cosine_similarity(k[1000:1100], k[1100:1200]).mean()
    far = torch.nn.functional.cosine_similarity(k[1000:1100], k[41000:41100]).mean()
    assert float(near) > 0.5 and abs(float(far)) < 0.5
