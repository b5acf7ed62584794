"""The three-level setting of the evaluation (hisa3): the shipped op with super-blocks, added
beside each two-level setting only where it is valid and its super level prunes."""
import argparse

import pytest
import torch

import hisa
from hisa.eval import cli
from hisa.eval.methods import Method
from hisa.testing.inputs import make_indexer_inputs


def _args(*extra):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(extra))


def test_plan_adds_a_pruning_three_level_twin_after_each_hisa():
    plans = dict(cli.method_plan(_args("--super-blocks", "2", "32"), 8192))
    labels = [m.label for m in plans["scaled"]]
    # k = 512, m*B = 2048: B = 64, m = 32 -> 64 super-blocks of 2 > 32 kept (prunes);
    # B = 128, m = 16 -> 32 super-blocks, not more than 32 kept: no twin.
    assert labels[labels.index("hisa B=64 m=32") + 1] == "hisa3 B=64 m=32 Bs=2 ms=32"
    assert not any(label.startswith("hisa3 B=128") for label in labels)
    assert "hisa3" not in {m.name for m in cli.method_plan(_args(), 8192)[0][1]}


def test_hisa3_method_is_the_public_three_level_op():
    inp = make_indexer_inputs([600], heads=4, head_dim=32, dtype=torch.float32, seed=2)
    m = Method("hisa3", topk=32, block_size=16, block_topk=8, super_size=2, super_topk=4)
    got = m.select(*inp.args(), backend="torch")
    want = hisa.hisa_index(*inp.args(), topk=32, block_size=16, block_topk=8, super_size=2,
                           super_topk=4, backend="torch")
    assert torch.equal(got, want)
    two = Method("hisa", topk=32, block_size=16, block_topk=8).select(*inp.args(),
                                                                      backend="torch")
    assert not torch.equal(got.sort(1).values, two.sort(1).values)   # the super level prunes


def test_super_fields_only_for_hisa3():
    with pytest.raises(ValueError, match="super_size"):
        Method("hisa", topk=8, block_size=16, block_topk=4, super_size=2, super_topk=4)
    with pytest.raises(ValueError, match="super_size"):
        Method("hisa3", topk=8, block_size=16, block_topk=4)
