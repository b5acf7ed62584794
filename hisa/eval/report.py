"""Result rows (:mod:`hisa.bench.rows` format plus extra keys), the printed table, its legend,
the one-line conclusion, and the Markdown tables of docs/fidelity.md. Plots: :mod:`.plots`."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch


def _mean(ts) -> float:
    x = torch.cat([t.flatten() for t in ts]).float() if ts else torch.zeros(0)
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


def fidelity_rows(model: str, L: int, methods, recs, ppl: dict, needle: dict, *,
                  budget: str, document: str = "austen", indexer: str = "proxy",
                  quality: dict | None = None, backend: str = "torch",
                  precision: str = "fp32") -> tuple[list[dict], list[dict]]:
    """(summary rows, one per method; per-layer/head rows).

    ``needle`` maps (label, depth) to a list of hits (or an accuracy); ``quality`` maps a
    layer to the per-query ratio of flat's attention mass to the true attention's top-k mass.
    """
    by = defaultdict(list)
    for r in recs:
        by[r["label"]].append(r)
    rows, detail = [], []
    for m in methods:
        rs = by.get(m.label, [])
        hits = [h for (lab, _), v in needle.items() if lab == m.label
                for h in (v if isinstance(v, list) else [v])]
        row = {"model": model, "indexer": indexer, "document": document, "context": L,
               "method": m.name, "block_size": m.block_size or None,
               "block_topk": (m.block_topk or (m.topk // m.block_size if m.block_size else None))
               if m.name != "flat" else None,
               "topk": m.topk or None, "iou_mean": None, "recall": None,
               "oracle_recall": None, "mass_kept": None, "occupancy": None,
               "ppl": ppl.get(m.label),
               "needle_acc": (sum(hits) / len(hits)) if hits else None,
               "needle_hits": int(sum(hits)) if hits else None,
               "needle_total": len(hits) or None,
               "label": m.label, "budget": budget,
               "backend": _row_backend(m, backend, precision), "precision": precision}
        if m.name == "flat":
            row.update(iou_mean=1.0, iou_positive=1.0, recall=1.0, mass_kept=1.0)
            if quality:
                row["indexer_quality"] = _mean(list(quality.values()))
                row["indexer_quality_by_layer"] = {str(ly): _mean([v])
                                                   for ly, v in quality.items()}
        if rs:
            per_layer = defaultdict(list)
            for r in rs:
                per_layer[r["layer"]].append(r)
            layer_iou = {ly: _mean([r["iou"] for r in v]) for ly, v in per_layer.items()}
            worst = min(layer_iou, key=layer_iou.get)
            depth = {}
            for qi, name in enumerate(("q1", "q2", "q3", "q4")):
                sel = []
                for r in rs:
                    pos = r["pos"].float() / L
                    keep = (pos >= 0.25 + 0.1875 * qi) & (pos < 0.25 + 0.1875 * (qi + 1) + 1e-9)
                    sel.append(r["recall"][keep])
                depth[name] = _mean(sel)
            row.update(iou_mean=_mean([r["iou"] for r in rs]),
                       iou_positive=_mean([r["iou_positive"] for r in rs]),
                       recall=_mean([r["recall"] for r in rs]),
                       oracle_recall=_mean([r["oracle"] for r in rs]),
                       mass_kept=_mean([r["mass"] for r in rs]),
                       occupancy=_mean([r["occupancy"] for r in rs]),
                       flat_mass_abs=_mean([r["mass_flat"] for r in rs]),
                       iou_worst_layer=layer_iou[worst], worst_layer=int(worst),
                       recall_by_query_position=depth,
                       queries=int(rs[0]["pos"].numel()))
            for r in rs:
                detail.append({"model": model, "indexer": indexer, "document": document,
                               "context": L, "method": m.name, "label": m.label,
                               "budget": budget, "layer": r["layer"], "head": r["head"],
                               "iou_mean": _mean([r["iou"]]), "recall": _mean([r["recall"]]),
                               "iou_positive": _mean([r["iou_positive"]]),
                               "oracle_recall": _mean([r["oracle"]]),
                               "mass_kept": _mean([r["mass"]]),
                               "occupancy": _mean([r["occupancy"]])})
        if hits:
            row["needle_by_depth"] = {
                f"{d:g}": (sum(v) / len(v) if isinstance(v, list) else v)
                for (lab, d), v in needle.items() if lab == m.label}
        rows.append(row)
    return rows, detail


def _row_backend(m, backend: str, precision: str) -> str:
    """Which code produced a row's selections: the shipped ops (resolved backend) or the
    eval-only torch variants."""
    if m.name == "dense":
        return "none"
    if m.name in ("flat", "hisa", "hisa3"):
        return f"{backend}-{precision}"
    return f"torch-{precision} (eval variant)"


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(_clean(r)) + "\n")


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _rel(v, ref):
    if v is None or ref is None or not ref:
        return None
    return 100.0 * (v / ref - 1.0)


def _doc(r) -> str:
    return r.get("document", "austen")


def _needles(r) -> str:
    if r.get("needle_total"):
        return f"{r['needle_hits']}/{r['needle_total']}"
    return "-"


COLUMNS = (
    ("doc", "document: austen (prose), code (Python stdlib sources), rag (short passages + "
            "questions)"),
    ("L", "context length in tokens"),
    ("method", "selection: flat k = flat top-k of the indexer (DSA); hisa B m = blocks of B "
               "tokens, m blocks kept by the block score, then top-k inside them; block_sparse "
               "= whole top blocks only, same token budget"),
    ("IoU", "|S & F| / |S | F| with flat's top-k set F, mean over queries and global layers"),
    ("recall", "share of flat's picks with a positive score that the method also keeps"),
    ("oracle", "recall of the best possible choice of m blocks (bounds HISA's recall)"),
    ("mass", "attention mass (the layer's real softmax) of the selected keys / flat's"),
    ("idx-q", "flat row: the indexer's own quality = mass of its top-k / mass of the true "
              "attention's top-k"),
    ("ppl", "perplexity of the sparse tail (the last tokens, scored with the prefix cached)"),
    ("dppl%", "perplexity change vs flat top-k, in percent (dense row: vs flat, negative = "
              "dense is better)"),
    ("needles", "questions answered (every answer token the argmax): needles for austen, "
                "passage questions for rag"),
)


def format_table(rows) -> str:
    """The printed table (one row per result row) followed by its legend."""
    head = (f"{'doc':6} {'L':>6} {'method':26} {'IoU':>6} {'recall':>6} {'oracle':>6} "
            f"{'mass':>6} {'idx-q':>6} {'ppl':>8} {'dppl%':>7} {'needles':>7}")
    lines = [head, "-" * len(head)]
    flat_ppl = {(_doc(r), r["context"], r.get("budget")): r.get("ppl")
                for r in rows if r["method"] == "flat"}
    prev = None
    for r in rows:
        key = (_doc(r), r["context"], r.get("budget"))
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        label = r["label"] + (" (DSA)" if r.get("budget") == "dsa_default" else "")
        dp = _rel(r.get("ppl"), flat_ppl.get(key)) if r["method"] != "flat" else None
        lines.append(f"{_doc(r):6} {r['context']:>6} {label:26} "
                     f"{_fmt(r['iou_mean'], '.3f'):>6} {_fmt(r['recall'], '.3f'):>6} "
                     f"{_fmt(r['oracle_recall'], '.3f'):>6} {_fmt(r['mass_kept'], '.3f'):>6} "
                     f"{_fmt(r.get('indexer_quality'), '.3f'):>6} "
                     f"{_fmt(r['ppl'], '.3f'):>8} {_fmt(dp, '+.1f'):>7} {_needles(r):>7}")
    lines.append("")
    lines.append("Columns:")
    width = max(len(c) for c, _ in COLUMNS)
    lines += [f"  {c:<{width}}  {text}" for c, text in COLUMNS]
    return "\n".join(lines)


def conclusion(rows) -> str:
    """One line: HISA against flat top-k, both against dense, for the first HISA setting of
    the first (document, context) of the rows."""
    hisa_rows = [r for r in rows if r["method"] == "hisa" and r.get("iou_mean") is not None]
    if not hisa_rows:
        return "no HISA row: nothing to conclude"
    h = hisa_rows[0]
    key = (_doc(h), h["context"], h.get("budget"))
    same = [r for r in rows if (_doc(r), r["context"], r.get("budget")) == key]
    flat = next((r for r in same if r["method"] == "flat"), None)
    dense = next((r for r in same if r["method"] == "dense"), None)
    parts = [f"{h['label']} at L={h['context']} ({_doc(h)}): IoU {h['iou_mean']:.2f} "
             f"with flat top-k, {h['mass_kept']:.1%} of its attention mass"]
    if flat and dense and h.get("ppl") and flat.get("ppl") and dense.get("ppl"):
        parts.append(f"perplexity {_rel(h['ppl'], dense['ppl']):+.1f}% vs dense "
                     f"(flat {_rel(flat['ppl'], dense['ppl']):+.1f}%)")
    if h.get("needle_total") and flat and flat.get("needle_total"):
        parts.append(f"needles {_needles(h)} (flat {_needles(flat)}"
                     + (f", dense {_needles(dense)})" if dense and dense.get("needle_total")
                        else ")"))
    verdict = _verdict(h, flat)
    return "Conclusion: " + "; ".join(parts) + f" -> {verdict}"


#: What counts as "matches flat" in the one-line verdict: the issue's targets (IoU 0.98,
#: 99 % of flat's mass, perplexity within 0.5 % of flat's).
MATCH_IOU, MATCH_MASS, MATCH_PPL_PCT = 0.98, 0.99, 0.5


def _verdict(h, flat) -> str:
    dp = _rel(h.get("ppl"), flat.get("ppl")) if flat else None
    ok = (h["iou_mean"] >= MATCH_IOU and h["mass_kept"] >= MATCH_MASS
          and (dp is None or dp <= MATCH_PPL_PCT))
    if ok:
        return "HISA matches flat top-k here (IoU >= 0.98, mass >= 99 %, ppl within 0.5 %)"
    gap = []
    if h["iou_mean"] < MATCH_IOU:
        gap.append(f"IoU {h['iou_mean']:.2f} < 0.98")
    if h["mass_kept"] < MATCH_MASS:
        gap.append(f"mass {h['mass_kept']:.1%} < 99 %")
    if dp is not None and dp > MATCH_PPL_PCT:
        gap.append(f"ppl {dp:+.1f}% vs flat")
    return "HISA falls short of flat top-k here (" + ", ".join(gap) + ")"


def markdown_table(rows) -> str:
    """The summary rows as a Markdown table (for docs/fidelity.md)."""
    out = ["| doc | L | method | IoU | recall | oracle | mass kept | indexer q | ppl | "
           "ppl vs flat | needles | backend |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    flat_ppl = {(_doc(r), r["context"], r.get("budget")): r.get("ppl")
                for r in rows if r["method"] == "flat"}
    for r in rows:
        key = (_doc(r), r["context"], r.get("budget"))
        dp = _rel(r.get("ppl"), flat_ppl.get(key)) if r["method"] != "flat" else None
        label = r["label"] + (" (DSA defaults)" if r.get("budget") == "dsa_default" else "")
        out.append(f"| {_doc(r)} | {r['context']} | {label} | "
                   f"{_fmt(r['iou_mean'], '.3f')} | {_fmt(r['recall'], '.3f')} | "
                   f"{_fmt(r['oracle_recall'], '.3f')} | {_fmt(r['mass_kept'], '.3f')} | "
                   f"{_fmt(r.get('indexer_quality'), '.3f')} | {_fmt(r['ppl'], '.2f')} | "
                   f"{_fmt(dp, '+.2f')}{'%' if dp is not None else ''} | {_needles(r)} | "
                   f"{r.get('backend', '-')} |")
    return "\n".join(out)


def series_label(r) -> str:
    """A setting's name that holds across contexts, in the table's terms: the scaled budget's
    m grows with L (m = L / (4 B) at m*B = L/4), block-sparse keeps 8 blocks of k/8."""
    if r["method"] == "block_sparse":
        return f"block_sparse m={r['block_topk']} (B=k/{r['block_topk']})"
    pool = r["block_size"] * r["block_topk"]
    ratio = round(r["context"] / pool) if pool else 0
    return f"{r['method']} B={r['block_size']} m=L/{ratio * r['block_size']}"


def load_bench_rows(paths) -> list[dict]:
    """HISA rows of ``hisa bench`` result files (JSON lines) that carry a speedup."""
    out = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line) if line.strip() else None
            if r and r.get("op") == "hisa" and r.get("speedup_vs_flat") is not None:
                out.append(r)
    return out


def speed_table(rows, bench_rows) -> str:
    """Fidelity vs speed: HISA-family rows by (model, L, m*B, B), joined with the benchmark
    rows of the same (context, block_size, block_topk, topk): the range of their speedups."""
    out = ["| model | L | k | m*B | B | m | method | IoU | IoU+ | recall | oracle | mass kept | "
           "speedup vs flat (GPU rows, same L, B, m, k) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    sel = [r for r in rows if r["method"] in ("hisa", "hisa_linear") and r.get("iou_mean")]
    sel.sort(key=lambda r: (r["model"], r["context"], r["block_size"] * r["block_topk"],
                            -r["block_size"], r["method"]))
    for r in sel:
        match = [b for b in bench_rows if b.get("context") == r["context"]
                 and b.get("block_size") == r["block_size"]
                 and b.get("block_topk") == r["block_topk"] and b.get("topk") == r["topk"]]
        if match:
            sp = [b["speedup_vs_flat"] for b in match]
            gpus = sorted({b.get("gpu", "?").replace("NVIDIA ", "") for b in match})
            modes = sorted({b.get("mode", "?") for b in match})
            speed = (f"{min(sp):.2f}-{max(sp):.2f}x ({'/'.join(modes)}, {len(sp)} rows, "
                     f"{', '.join(gpus)})")
        else:
            speed = "pending (no GPU row at this setting)"
        out.append(f"| {r['model']} | {r['context']} | {r['topk']} | "
                   f"{r['block_size'] * r['block_topk']} | {r['block_size']} | "
                   f"{r['block_topk']} | {r['method']} | {_fmt(r['iou_mean'], '.3f')} | "
                   f"{_fmt(r.get('iou_positive'), '.3f')} | {_fmt(r['recall'], '.3f')} | "
                   f"{_fmt(r['oracle_recall'], '.3f')} | "
                   f"{_fmt(r['mass_kept'], '.3f')} | {speed} |")
    return "\n".join(out)
