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


def test_three_level_rows_get_their_own_table(tmp_path, capsys):
    env = environment("c")
    common = dict(mode="prefill_chunk", context=1 << 20, queries=1024, batch=1)
    rows = [make_row(env, op="flat", ms=29.0, tflops=600.0, peak_mib=1100.0, **common),
            make_row(env, op="hisa", ms=1.0, speedup_vs_flat=29.0, peak_mib=150.0, **common),
            make_row(env, op="hisa3", ms=0.5, speedup_vs_flat=58.0, speedup_vs_two_level=2.0,
                     peak_mib=140.0, levels=3, super_size=16, super_topk=64, **common)]
    append_rows(tmp_path / "l.jsonl", rows)
    assert main(["bench", "--report", str(tmp_path / "l.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "| chunk | 1024K | 1,024 | 16 x 64 | 29.00 ms | 1.00 ms (29.0x) | 0.50 ms (58.0x) | " \
           "2.00x | 1100 / 150 / 140 |" in out


def test_three_level_flop_model_counts_each_level():
    ks = torch.zeros(2, dtype=torch.int32)
    ke = torch.tensor([1000, 5000], dtype=torch.int32)
    # B = 100, Bs = 4, ms = 3, m = 4: row 0 has 10 blocks in 3 super-blocks (all kept, 10
    # blocks scored); row 1 has 50 blocks in 13 super-blocks, ms * Bs = 12 blocks scored.
    got = hisa_prefill_flops(ks, ke, 2, 4, block_size=100, block_topk=4, super_size=4,
                             super_topk=3)
    assert got == ((3 + 10) + (13 + 12) + 2 * 4 * 100) * 16


def test_plot_draws_one_series_per_super_setting(tmp_path):
    from hisa.bench.plot import _series, plot_rows
    env = environment("c")
    rows = [make_row(env, op=op, mode="decode", context=c, queries=1, batch=1, next_n=1, ms=ms,
                     **extra)
            for c in (1 << 18, 1 << 20)
            for op, ms, extra in (("flat", 1.0, {}), ("hisa", 0.05, {}),
                                  ("hisa3", 0.04, dict(super_size=2, super_topk=128)),
                                  ("hisa3", 0.03, dict(super_size=16, super_topk=64)))]
    assert {_series(r) for r in rows} == {"flat", "hisa", "hisa3 2x128", "hisa3 16x64"}
    path = plot_rows(rows, tmp_path / "p.png")
    assert path is None or path.exists()
