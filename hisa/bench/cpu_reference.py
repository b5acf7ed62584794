"""CPU benchmark of the plain-PyTorch references (``backend="torch"``): hisa_index vs dsa_index.

What a user without a GPU, and the CPU test suite, pay for each indexer. Full causal prefill of
one sequence, DeepSeek-V3.2 indexer shapes (H = 64, D = 128, FP8 q and k with per-token k
scales), B = 128. Each context runs the DSA defaults (k = 2048, m = 64) and, at contexts where
those keep every block (m * B >= L), also a pruning setting (k = L / 16, m * B = L / 4).

Every setting is checked before a number is written: both outputs in the contract's format;
HISA equal to flat as sets (up to score ties) where every block is kept; and on sampled rows,
both selections against an independent float64 computation written here (no library code but
the input factory). The two ops alternate within each repeat so that load from other processes
falls on both; rows record the load average and the process CPU time beside the wall time
(on a shared machine the wall time of a two-thread run stretches with the load; the CPU time
much less).

    python -m hisa.bench.cpu_reference --out benchmarks/results/cpu_reference.jsonl
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import hisa

from ..testing.compare import TIE_RTOL, check_index_format
from ..testing.inputs import make_indexer_inputs
from .prefill import sample_rows
from .rows import append_rows, git_commit

HEADS, HEAD_DIM, BLOCK_SIZE = 64, 128, 128
DEFAULT_CONTEXTS = (4096, 8192, 16384)
#: Sampled rows checked against the float64 oracle (each costs one [H, S] float64 product).
CHECK_ROWS = 12
#: fp32 scores of FP8 inputs (exact products, fp32 sums of 128 products and 64 heads) differ
#: from float64 by about 1e-7 of the row's largest |score|: this allows a hundred times that.
SCORE_ROW_TOL = 1e-5
#: Block scores within this gap (relative to the row's largest |J|) of the m-th kept block are a
#: near-tie: fp32 and float64 may rank them differently, so such a row's token set is not
#: compared entry for entry (its blocks are checked to lie on the right side of the tie).
BLOCK_TIE_RTOL = 1e-4


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def settings_for(context: int) -> list[tuple[int, int]]:
    """(topk, block_topk) pairs run at ``context``: the defaults, and where those keep every
    block, one that prunes (k = L / 16, m * B = L / 4; m > 2, so a slot is left beside the forced
    first and last block)."""
    out = [(2048, 64)]
    if 64 * BLOCK_SIZE >= context and context // 4 // BLOCK_SIZE > 2:
        out.append((context // 16, context // 4 // BLOCK_SIZE))
    return out


def fp64_row(inp, t: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Exact scores of query ``t`` in float64, from the inputs alone.

    Returns:
        (token scores [L] over the window [ks, ke), block scores J over the eligible blocks
         (+inf on the forced first and last), the first eligible block id).
    """
    a, e = int(inp.ks[t]), int(inp.ke[t])

    def dequant(lo: int, hi: int) -> torch.Tensor:
        return inp.k[lo:hi].double() * inp.k_scale[lo:hi].double().unsqueeze(1)

    qd, wd = inp.q[t].double(), inp.weights[t].double()                       # [H, D], [H]
    tokens = (wd.unsqueeze(1) * (qd @ dequant(a, e).T).clamp_min(0)).sum(0)     # [L]
    # Blocks tile the key buffer; a block's mean covers all its tokens, in the window or not.
    first, end = a // block_size, -(-e // block_size)
    full = dequant(first * block_size, min(inp.k.shape[0], end * block_size))
    means = torch.stack([blk.mean(0) for blk in full.split(block_size)])      # [nb, D]
    blocks = (wd.unsqueeze(1) * (qd @ means.T).clamp_min(0)).sum(0)            # [nb]
    blocks[0] = blocks[-1] = float("inf")
    return tokens, blocks, first


def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` best entries, ties to the lower index (a stable descending sort)."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def check_tie_tolerant(got: set, want: set, scores: torch.Tensor, label: str) -> None:
    """Raise unless the sets are equal up to ties at the k-th score (scores: float64 [L]).

    A tie is a score within TIE_RTOL of the k-th, or within SCORE_ROW_TOL of the row's largest
    |score| (signed gates can put the k-th score near 0, where fp32 error is absolute)."""
    assert len(got) == len(want), f"{label}: {len(got)} selected, expected {len(want)}"
    if got == want:
        return
    kth = float(scores[list(want)].min())
    slack = TIE_RTOL * abs(kth) + SCORE_ROW_TOL * float(scores.abs().max())
    for x in got ^ want:
        v = float(scores[x])
        assert abs(v - kth) <= slack, \
            f"{label}: offset {x} (score {v}) differs from the oracle; k-th score {kth}"


def check_against_oracle(inp, flat_idx, hisa_idx, hisa_scores, *, topk: int,
                         block_topk: int) -> dict:
    """Both selections on sampled rows against :func:`fp64_row`; returns check counts."""
    rows = sample_rows(inp.num_queries, CHECK_ROWS, "cpu").tolist()
    near_ties = 0
    for t in rows:
        tokens, blocks, first = fp64_row(inp, t, BLOCK_SIZE)
        a = int(inp.ks[t])
        row_tol = SCORE_ROW_TOL * float(tokens.abs().max())
        flat = {x for x in flat_idx[t].tolist() if x >= 0}
        check_tie_tolerant(flat, set(top_positions(tokens, topk).tolist()), tokens,
                           f"flat row {t}")
        got = hisa_idx[t].long()
        got = got[got >= 0]
        err = (hisa_scores[t, :got.numel()].double() - tokens[got]).abs().max()
        assert float(err) <= row_tol, f"hisa row {t}: score error {float(err)} > {row_tol}"
        order = top_positions(blocks, blocks.numel())
        kept = order[:block_topk]
        got_blocks = set(((got + a) // BLOCK_SIZE - first).tolist())
        if blocks.numel() > block_topk:
            mth, nxt = float(blocks[kept[-1]]), float(blocks[order[block_topk]])
            scale = float(blocks[torch.isfinite(blocks)].abs().max())
            if math.isfinite(mth) and mth - nxt <= BLOCK_TIE_RTOL * scale:
                near_ties += 1                   # either side of the tie is right
                allowed = blocks >= nxt
                assert all(bool(allowed[b]) for b in got_blocks), f"hisa row {t}: block"
                continue
        assert got_blocks <= set(kept.tolist()), f"hisa row {t}: token outside the kept blocks"
        cand = torch.cat([torch.arange(int(b) * BLOCK_SIZE, (int(b) + 1) * BLOCK_SIZE)
                          for b in kept + first]) - a
        cand = cand[(cand >= 0) & (cand < tokens.numel())]
        want = set(cand[top_positions(tokens[cand], topk)].tolist())
        check_tie_tolerant(set(got.tolist()), want, tokens, f"hisa row {t}")
    return {"oracle_rows": len(rows), "oracle_block_near_ties": near_ties}


def check_equal_to_flat(flat, hisa_out) -> int:
    """Where every block is kept HISA must select flat's set (up to ties at the k-th score,
    judged by the returned scores); returns the number of rows that differ by such ties."""
    (fi, fs), (hi, hs) = flat, hisa_out
    differ = (torch.sort(fi, 1).values != torch.sort(hi, 1).values).any(1).nonzero().squeeze(1)
    for t in differ.tolist():
        sf = dict(zip(fi[t].tolist(), fs[t].tolist()))
        sh = dict(zip(hi[t].tolist(), hs[t].tolist()))
        sf.pop(-1, None), sh.pop(-1, None)
        assert len(sf) == len(sh), f"row {t}: valid counts differ"
        if not sf:
            continue
        kth = min(min(sf.values()), min(sh.values()))
        slack = TIE_RTOL * abs(kth) + SCORE_ROW_TOL * max(abs(v) for v in sf.values())
        for x in set(sf) ^ set(sh):
            v = sf.get(x, sh.get(x))
            assert abs(v - kth) <= slack, \
                f"row {t}: offset {x} (score {v}) selected by one side only; k-th {kth}"
    return int(differ.numel())


def run_setting(context: int, topk: int, block_topk: int, repeats: int, seed: int,
                log) -> list[dict]:
    inp = make_indexer_inputs([context], heads=HEADS, head_dim=HEAD_DIM, seed=seed)
    common = dict(k_scale=inp.k_scale, topk=topk, return_scores=True, backend="torch")

    def flat():
        return hisa.dsa_index(*inp.args(), **common)

    def hier():
        return hisa.hisa_index(*inp.args(), block_size=BLOCK_SIZE, block_topk=block_topk,
                               **common)

    times = {"flat": [], "hisa": []}
    cpu_times = {"flat": [], "hisa": []}
    outputs = {}
    load = [os.getloadavg()[0]]
    for r in range(repeats):
        order = [("flat", flat), ("hisa", hier)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu_times[name].append((time.process_time() - c0) * 1e3)
            if name not in outputs:
                outputs[name] = out
            else:
                assert torch.equal(out[0], outputs[name][0]), f"{name}: runs differ"
            log(f"  L={context} k={topk} m={block_topk} {name} run {r + 1}: "
                f"{times[name][-1] / 1e3:.2f} s (load {os.getloadavg()[0]:.1f})")
        if r == 0:                                  # check before any timing is kept
            check = verify(inp, outputs, topk=topk, block_topk=block_topk)
            log(f"  check passed: {check}")
    load.append(os.getloadavg()[0])
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "commit": git_commit(), "command": " ".join(["python -m hisa.bench.cpu_reference"]
                                                       + sys.argv[1:]),
           "loadavg_1m": load}
    flat_ms = statistics.median(times["flat"])
    rows = []
    for name in ("flat", "hisa"):
        ms = statistics.median(times[name])
        row = {"op": name, "mode": "prefill", "backend": "torch", "context": context,
               "queries": inp.num_queries, "batch": 1, "next_n": None, "ms": ms,
               "runs_ms": [round(x, 1) for x in times[name]],
               "cpu_ms": statistics.median(cpu_times[name]),
               "speedup_vs_flat": flat_ms / ms if name == "hisa" else None, **env,
               "topk": topk, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "float8_e4m3fn",
               "check": check}
        if name == "hisa":
            row.update(block_size=BLOCK_SIZE, block_topk=block_topk,
                       prunes=block_topk * BLOCK_SIZE < context)
        rows.append(row)
    return rows


def verify(inp, outputs, *, topk: int, block_topk: int) -> dict:
    (fi, fs), (hi, hs) = outputs["flat"], outputs["hisa"]
    check_index_format(fi, inp.ks, inp.ke, topk)
    check_index_format(hi, inp.ks, inp.ke, topk, exact_count=False)
    summary = check_against_oracle(inp, fi, hi, hs, topk=topk, block_topk=block_topk)
    if block_topk * BLOCK_SIZE >= inp.k.shape[0]:
        summary["equal_to_flat_rows"] = inp.num_queries
        summary["tie_differing_rows"] = check_equal_to_flat((fi, fs), (hi, hs))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS),
                   help="sequence lengths L (full causal prefill, L queries)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each op per setting")
    p.add_argument("--defaults-only", action="store_true",
                   help="skip the pruning setting (k = L/16, m*B = L/4) at small contexts")
    p.add_argument("--seed", type=int, default=0, help="input seed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--out", type=Path, default=None, help="append JSON rows to this file")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    for context in args.contexts:
        for topk, block_topk in settings_for(context)[:1 if args.defaults_only else None]:
            rows = run_setting(context, topk, block_topk, args.repeats, args.seed, log)
            flat, hier = rows
            print(f"L={context:>6} k={topk:>5} m={block_topk:>3}: flat {flat['ms'] / 1e3:8.2f} s"
                  f"  hisa {hier['ms'] / 1e3:8.2f} s  ({hier['speedup_vs_flat']:.2f}x)",
                  flush=True)
            if args.out:
                append_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
