"""The benchmark's check-then-time logic on CPU (kernels under the interpreter, the timer
replaced by one call): every op's output is checked against its reference before a row is
made, and the rows carry what the report and the targets need. Catches a broken sweep before
it costs GPU time."""
import pytest
import torch

from hisa.bench import decode as bench_decode
from hisa.bench import prefill as bench_prefill
from hisa.bench.prefill import HISA_MIN_IOU
from hisa.bench.rows import ROW_KEYS, environment
from hisa.bench.timer import Timing


def _one_call(fn, **_):
    fn()
    return Timing(1.0, 1.0, 1.0, 1)


@pytest.fixture
def fast_timer(monkeypatch):
    monkeypatch.setattr(bench_prefill, "time_op", _one_call)
    monkeypatch.setattr(bench_decode, "time_op", _one_call)


def test_prefill_point_checks_and_rows_three_levels(fast_timer):
    rows = bench_prefill.bench_prefill_point(
        300, queries=12, env=environment("t"), topk=24, block_size=16, block_topk=4, heads=16,
        head_dim=64, super_configs=((2, 3),), check_reps="kernel", device="cpu")
    assert [r["op"] for r in rows] == ["flat", "hisa", "hisa3"]
    assert all(set(ROW_KEYS) <= set(r) for r in rows)
    three = rows[2]
    assert three["levels"] == 3 and three["super_size"] == 2 and three["super_topk"] == 3
    assert three["speedup_vs_two_level"] == 1.0 and three["iou_vs_reference"] >= HISA_MIN_IOU
    assert list(three["stage_ms"]) == ["pool", "pool_supers", "super_select", "block_select",
                                       "token_scores", "select_tokens"]
    # A chunk's HISA rows also time the call given its window plan (checked equal first).
    assert rows[1]["planned_ms"] == 1.0 and three["planned_ms"] == 1.0
    assert "planned_ms" not in rows[0]


def test_planned_chunk_call_must_select_what_the_unplanned_did(fast_timer, monkeypatch):
    real = bench_prefill.hisa.hisa_index

    def wrong_when_planned(*args, plan=None, out=None, **kw):
        got = real(*args, plan=plan, out=out, **kw)
        if plan is not None:
            out[0, 0] = -5                          # one index off in the planned call only
        return got
    monkeypatch.setattr(bench_prefill.hisa, "hisa_index", wrong_when_planned)
    with pytest.raises(RuntimeError, match="planned call selected other indices"):
        bench_prefill.bench_prefill_point(
            300, queries=12, env=environment("t"), topk=24, block_size=16, block_topk=4,
            heads=16, head_dim=64, check_reps="kernel", device="cpu")


def test_prefill_check_rejects_a_wrong_selection():
    from hisa.testing.inputs import make_indexer_inputs
    inp = make_indexer_inputs([300], query_lens=[12], heads=16, head_dim=64, clustered=True)
    kw = dict(topk=24, block_size=16, block_topk=4)
    flat, _ = bench_prefill.naive_dsa_index(*inp.args(), k_scale=inp.k_scale, topk=24)
    wrong = torch.where(flat >= 0, (flat + 7) % (inp.ke - inp.ks)[:, None], -1).to(torch.int32)
    with pytest.raises(AssertionError):
        bench_prefill.check_prefill(inp, flat, wrong, super_size=2, super_topk=3, **kw)


def test_decode_point_checks_and_rows_three_levels(fast_timer):
    rows = bench_decode.bench_decode_point(
        700, batch=2, next_n=1, env=environment("t"), topk=32, block_size=64, block_topk=3,
        heads=16, head_dim=64, super_configs=((2, 2), (3, 2)), auto=False, device="cpu")
    assert [r["op"] for r in rows] == ["flat", "hisa", "hisa3", "hisa3"]
    assert [r["super_size"] for r in rows[2:]] == [2, 3]
    assert all(r["levels"] == 3 and r["iou_vs_reference"] >= HISA_MIN_IOU for r in rows[2:])
    assert all(r["gbps"] > 0 for r in rows[1:])
