"""Markdown tables drawn from result rows (the README's benchmark tables come from here)."""
from __future__ import annotations

from collections import defaultdict


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def prefill_table(rows: list[dict]) -> str:
    """One line per (mode, context): flat and HISA time, TFLOP/s, speedup, stage split."""
    pts = defaultdict(dict)
    for r in rows:
        if r["mode"].startswith("prefill"):
            pts[(r["mode"], r["context"], r["queries"])][r["op"]] = r
    out = ["| setting | context | queries | flat ms | flat TFLOP/s | HISA ms | HISA speedup | HISA stages (ms) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (mode, ctx, q), ops in sorted(pts.items()):
        f, h = ops.get("flat"), ops.get("hisa")
        if not (f and h):
            continue
        stages = ", ".join(f"{k} {v:.2f}" for k, v in (h.get("stage_ms") or {}).items())
        name = "full causal" if mode == "prefill" else "chunk"
        # A chunk's call given its window plan (read once a step, outside the timing).
        planned = f" (planned {h['planned_ms']:.2f})" if h.get("planned_ms") else ""
        out.append(f"| {name} | {_k(ctx)} | {q:,} | {f['ms']:.2f} | {f['tflops']:.0f} | "
                   f"{h['ms']:.2f}{planned} | {h['speedup_vs_flat']:.2f}x | {stages} |")
    return "\n".join(out)


def decode_table(rows: list[dict], next_n: int = 1) -> str:
    """Context x batch grid of 'flat us / HISA us (speedup)' for one next_n."""
    cells = defaultdict(dict)
    for r in rows:
        if r["mode"] == "decode" and r.get("next_n") == next_n:
            cells[(r["context"], r["batch"])][r["op"]] = r
    batches = sorted({b for _, b in cells})
    ctxs = sorted({c for c, _ in cells})
    out = ["| context | " + " | ".join(f"batch {b}" for b in batches) + " |",
           "| --- |" + " --- |" * len(batches)]
    for c in ctxs:
        line = []
        for b in batches:
            ops = cells.get((c, b), {})
            f, h = ops.get("flat"), ops.get("hisa")
            line.append(f"{f['ms'] * 1e3:.0f} / {h['ms'] * 1e3:.0f} us ({h['speedup_vs_flat']:.2f}x)"
                        if f and h else "-")
        out.append(f"| {_k(c)} | " + " | ".join(line) + " |")
    return "\n".join(out)


def three_level_table(rows: list[dict]) -> str:
    """Flat, two-level and three-level HISA side by side at each measured point (the rows of
    ``hisa bench --super-size``, one line per super-block setting): time, speedup over flat,
    and peak memory for prefill."""
    pts = defaultdict(lambda: {"hisa3": []})
    for r in rows:
        key = (r["mode"], r["context"], r["queries"], r.get("batch"), r.get("next_n"))
        if r["op"] == "hisa3":
            pts[key]["hisa3"].append(r)
        else:
            pts[key][r["op"]] = r
    out = ["| setting | context | queries / batch | Bs x ms | flat | two-level (x flat) | "
           "three-level (x flat) | three vs two | peak MiB flat / 2L / 3L |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (mode, ctx, q, b, nn), ops in sorted(pts.items(), key=lambda kv: str(kv[0])):
        f, h = ops.get("flat"), ops.get("hisa")
        if not (f and h):
            continue
        dec = mode == "decode"
        unit, scale = ("us", 1e3) if dec else ("ms", 1.0)
        t = lambda r: f"{r['ms'] * scale:.{0 if dec else 2}f} {unit}"  # noqa: E731
        who = f"batch {b}" + (f", next_n {nn}" if nn != 1 else "") if dec else f"{q:,}"
        name = {"decode": "decode", "prefill": "full causal"}.get(mode, "chunk")
        for h3 in sorted(ops["hisa3"], key=lambda r: (r["super_size"], r["super_topk"])):
            peak = "-" if dec else " / ".join(f"{r.get('peak_mib') or 0:.0f}"
                                              for r in (f, h, h3))
            out.append(f"| {name} | {_k(ctx)} | {who} | {h3['super_size']} x "
                       f"{h3['super_topk']} | {t(f)} | {t(h)} ({h['speedup_vs_flat']:.1f}x) | "
                       f"{t(h3)} ({h3['speedup_vs_flat']:.1f}x) | "
                       f"{h3['speedup_vs_two_level']:.2f}x | {peak} |")
    return "\n".join(out)


def markdown_report(rows: list[dict]) -> str:
    parts = []
    gpus = sorted({r["gpu"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    parts.append(f"GPU: {', '.join(gpus)}; commit {', '.join(commits)}")
    if any(r["mode"].startswith("prefill") for r in rows):
        parts.append(prefill_table(rows))
    for nn in sorted({r.get("next_n") for r in rows if r["mode"] == "decode"}):
        parts.append(f"Decode, next_n = {nn}: flat / HISA per step (speedup)\n\n"
                     + decode_table(rows, nn))
    if any(r["op"] == "hisa3" for r in rows):
        parts.append("Three levels (super-blocks, blocks, tokens) beside two and flat\n\n"
                     + three_level_table(rows))
    return "\n\n".join(parts)
