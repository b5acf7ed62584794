"""The benchmark's CPU-side pieces: rows, tables and the FLOP model (timing needs a GPU)."""
import json

import torch

from hisa.bench.models import flat_prefill_flops, hisa_prefill_flops
from hisa.bench.report import markdown_report
from hisa.bench.rows import ROW_KEYS, append_rows, environment, make_row, read_rows
from hisa.bench.timer import time_op
from hisa.cli import main


def test_rows_roundtrip_and_carry_required_keys(tmp_path):
    env = environment("abc123")
    rows = [make_row(env, op="flat", mode="prefill", context=8192, queries=8192, batch=1,
                     ms=2.0, tflops=300.0),
            make_row(env, op="hisa", mode="prefill", context=8192, queries=8192, batch=1,
                     ms=1.0, tflops=200.0, speedup_vs_flat=2.0, stage_ms={"pool": 0.1})]
    path = tmp_path / "r.jsonl"
    append_rows(path, rows)
    back = read_rows(path)
    assert back == json.loads(json.dumps(rows))
    assert all(set(ROW_KEYS) <= set(r) for r in back) and back[0]["commit"] == "abc123"
    table = markdown_report(back)
    assert "| full causal | 8K | 8,192 | 2.00 | 300 | 1.00 | 2.00x | pool 0.10 |" in table


def test_report_command_prints_decode_grid(tmp_path, capsys):
    env = environment("c")
    rows = [make_row(env, op=op, mode="decode", context=65536, queries=8, batch=8, next_n=1,
                     ms=ms, speedup_vs_flat=None if op == "flat" else 0.1 / 0.04)
            for op, ms in (("flat", 0.1), ("hisa", 0.04))]
    append_rows(tmp_path / "d.jsonl", rows)
    assert main(["bench", "--report", str(tmp_path / "d.jsonl")]) == 0
    assert "| 64K | 100 / 40 us (2.50x) |" in capsys.readouterr().out


def test_flop_models_count_visible_and_kept_pairs():
    ks = torch.zeros(3, dtype=torch.int32)
    ke = torch.tensor([1, 200, 1000], dtype=torch.int32)
    assert flat_prefill_flops(ks, ke, 2, 4) == 1201 * 16
    # blocks of 100, m = 4: eligible 1, 2, 10 -> kept 1, 2, 4 blocks of 100 tokens
    assert hisa_prefill_flops(ks, ke, 2, 4, block_size=100, block_topk=4) == (13 + 700) * 16


def test_cpu_timer_returns_a_median():
    t = time_op(lambda: sum(range(1000)), warmup=1, runs=5)
    assert t.runs == 5 and t.p20_ms <= t.median_ms <= t.p80_ms
