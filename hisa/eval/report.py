"""Result rows (targets.md "Result rows" format), the printed table and the PNG plots."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch


def _mean(ts) -> float:
    x = torch.cat([t.flatten() for t in ts]).float()
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else float("nan")


def fidelity_rows(model: str, L: int, methods, recs, ppl: dict, needle: dict, *,
                  budget: str) -> tuple[list[dict], list[dict]]:
    """(summary rows, one per method; per-layer/head rows)."""
    by = defaultdict(list)
    for r in recs:
        by[r["label"]].append(r)
    rows, detail = [], []
    for m in methods:
        rs = by.get(m.label, [])
        accs = [v for (lab, _), v in needle.items() if lab == m.label]
        row = {"model": model, "context": L, "method": m.name,
               "block_size": m.block_size or None,
               "block_topk": (m.block_topk or (m.topk // m.block_size if m.block_size else None))
               if m.name != "flat" else None,
               "topk": m.topk or None, "iou_mean": None, "recall": None,
               "oracle_recall": None, "mass_kept": None, "occupancy": None,
               "ppl": ppl.get(m.label), "needle_acc": (sum(accs) / len(accs)) if accs else None,
               "label": m.label, "budget": budget}
        if m.name == "flat":
            row.update(iou_mean=1.0, iou_positive=1.0, recall=1.0, mass_kept=1.0)
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
                       iou_positive=_mean([r["iou_positive"] for r in rs])
                       if "iou_positive" in rs[0] else None,
                       recall=_mean([r["recall"] for r in rs]),
                       oracle_recall=_mean([r["oracle"] for r in rs]),
                       mass_kept=_mean([r["mass"] for r in rs]),
                       occupancy=_mean([r["occupancy"] for r in rs]),
                       flat_mass_abs=_mean([r["mass_flat"] for r in rs]),
                       iou_worst_layer=layer_iou[worst], worst_layer=int(worst),
                       recall_by_query_position=depth,
                       queries=int(rs[0]["pos"].numel()))
            for r in rs:
                detail.append({"model": model, "context": L, "method": m.name,
                               "label": m.label, "layer": r["layer"], "head": r["head"],
                               "iou_mean": _mean([r["iou"]]), "recall": _mean([r["recall"]]),
                               "iou_positive": _mean([r["iou_positive"]])
                               if "iou_positive" in r else None,
                               "oracle_recall": _mean([r["oracle"]]),
                               "mass_kept": _mean([r["mass"]]),
                               "occupancy": _mean([r["occupancy"]])})
        if needle:
            row["needle_by_depth"] = {f"{d:g}": v for (lab, d), v in needle.items()
                                      if lab == m.label}
        rows.append(row)
    return rows, detail


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(_clean(r)) + "\n")


def _clean(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    return x


def _fmt(v, spec):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_table(rows) -> str:
    head = (f"{'model':8} {'L':>6} {'method':28} {'IoU':>6} {'IoU+':>6} {'recall':>6} {'oracle':>6} "
            f"{'mass':>6} {'occ':>6} {'ppl':>8} {'needle':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:8} {r['context']:>6} {r['label']:28} "
                     f"{_fmt(r['iou_mean'], '.3f'):>6} {_fmt(r.get('iou_positive'), '.3f'):>6} "
                     f"{_fmt(r['recall'], '.3f'):>6} "
                     f"{_fmt(r['oracle_recall'], '.3f'):>6} {_fmt(r['mass_kept'], '.3f'):>6} "
                     f"{_fmt(r['occupancy'], '.1f'):>6} {_fmt(r['ppl'], '.3f'):>8} "
                     f"{_fmt(r['needle_acc'], '.2f'):>6}")
    return "\n".join(lines)


def series_label(r) -> str:
    """A setting's name that holds across contexts (m and block-sparse's B scale with L)."""
    if r["method"] == "block_sparse":
        return f"block_sparse {r['block_topk']} blocks of k/{r['block_topk']}"
    pool = r["block_size"] * r["block_topk"] // r["topk"]
    return f"{r['method']} B={r['block_size']} m*B={pool}k"


def plot_all(rows, out: Path) -> list[Path]:
    """IoU vs context, attention mass kept vs context, and the needle heat map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, ylabel, fname in (("iou_mean", "top-k IoU with flat", "iou_vs_context.png"),
                               ("iou_positive", "IoU+ with flat (strictly positive picks)",
                                "iou_positive_vs_context.png"),
                               ("mass_kept", "attention mass kept / flat's",
                                "mass_kept_vs_context.png")):
        series = defaultdict(list)
        for r in rows:
            if (r["method"] not in ("dense", "flat") and r.get(key) is not None
                    and r.get("budget", "scaled") == "scaled"):
                series[(r["model"], series_label(r))].append((r["context"], r[key]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        for (model, label), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{model} {label}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens); k = L/16, m*B = 4k")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        made.append(out / fname)
    needle_rows = [r for r in rows if r.get("needle_by_depth")]
    if needle_rows:
        depths = sorted({float(d) for r in needle_rows for d in r["needle_by_depth"]})
        labels = [f"{r['model']} L={r['context']} {r['label']}" for r in needle_rows]
        grid = [[r["needle_by_depth"].get(f"{d:g}", float("nan")) for d in depths]
                for r in needle_rows]
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(depths), 0.5 + 0.32 * len(labels)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("needle depth")
        fig.colorbar(im, ax=ax, label="accuracy")
        fig.tight_layout()
        fig.savefig(out / "needle_heatmap.png", dpi=110)
        plt.close(fig)
        made.append(out / "needle_heatmap.png")
    return made


def markdown_table(rows) -> str:
    """The summary rows as a Markdown table (for docs/fidelity.md)."""
    out = ["| L | method | IoU | IoU+ | recall | oracle | mass kept | occupancy | ppl | needle |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['context']} | {r['label']} | {_fmt(r['iou_mean'], '.3f')} | "
                   f"{_fmt(r.get('iou_positive'), '.3f')} | "
                   f"{_fmt(r['recall'], '.3f')} | {_fmt(r['oracle_recall'], '.3f')} | "
                   f"{_fmt(r['mass_kept'], '.3f')} | {_fmt(r['occupancy'], '.1f')} | "
                   f"{_fmt(r['ppl'], '.2f')} | {_fmt(r['needle_acc'], '.2f')} |")
    return "\n".join(out)


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
                   f"{_fmt(r.get('iou_positive'), '.3f')} | {_fmt(r['recall'], '.3f')} | {_fmt(r['oracle_recall'], '.3f')} | "
                   f"{_fmt(r['mass_kept'], '.3f')} | {speed} |")
    return "\n".join(out)
