"""PNG charts drawn from result rows (never by hand).

* one context: grouped bars per method (IoU, recall, oracle, mass kept vs flat), perplexity
  bars (dense, flat and every method) and needle bars (answered / asked);
* several contexts: IoU and mass kept against the context, one line per setting, named as in
  the table (m, with m = L / (4 B) at the scaled budget).

Every chart has a title naming the model, the indexer, the document and the budget; method
labels are the table's labels, rotated so that they do not run together.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import _doc, series_label

_METRICS = (("iou_mean", "IoU with flat"), ("recall", "recall of flat's picks"),
            ("oracle_recall", "oracle (best m blocks)"), ("mass_kept", "attention mass / flat's"))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _title(rows, what: str) -> str:
    r = rows[0]
    k = next((x["topk"] for x in rows if x["method"] == "flat"), None)
    budget = "DSA defaults" if r.get("budget") == "dsa_default" else "scaled budget"
    return (f"{r['model']}, {r.get('indexer', 'proxy')} indexer, {_doc(r)}, L={r['context']}, "
            f"k={k} ({budget})\n{what}")


def _save(fig, path: Path, made: list) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits below the labels
    made.append(path)


def plot_context(rows, out: Path) -> list[Path]:
    """The single-context charts of one (document, context, budget) group of rows."""
    plt = _plt()
    made = []
    first = rows[0]
    tag = f"{_doc(first)}_L{first['context']}_{first.get('budget', 'scaled')}"
    sel = [r for r in rows if r["method"] not in ("dense", "flat") and r.get("iou_mean")
           is not None]
    if sel:
        fig, ax = plt.subplots(figsize=(max(6.5, 1.1 * len(sel) + 2), 4.6))
        width = 0.8 / len(_METRICS)
        for j, (key, name) in enumerate(_METRICS):
            xs = [i + (j - (len(_METRICS) - 1) / 2) * width for i in range(len(sel))]
            vals = [r.get(key) or 0.0 for r in sel]
            bars = ax.bar(xs, vals, width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
        ax.set_xticks(range(len(sel)), [r["label"] for r in sel], rotation=25, ha="right",
                      fontsize=8)
        top = max([1.0] + [r.get(key) or 0.0 for r in sel for key, _ in _METRICS])
        ax.set_ylim(0, 1.1 * top)
        ax.set_ylabel("fraction (1 = same as flat top-k)")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.32),
                  frameon=False)
        ax.set_title(_title(rows, "selection fidelity against flat top-k"), fontsize=9)
        _save(fig, out / f"fidelity_{tag}.png", made)
        plt.close(fig)
    ppl = [r for r in rows if r.get("ppl") is not None]
    if ppl:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(ppl) + 2), 4.2))
        colours = ["#555555" if r["method"] == "dense" else "#1f77b4" if r["method"] == "flat"
                   else "#ff7f0e" for r in ppl]
        bars = ax.bar(range(len(ppl)), [r["ppl"] for r in ppl], color=colours)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        lo = min(r["ppl"] for r in ppl)
        hi = max(r["ppl"] for r in ppl)
        ax.set_ylim(max(0.0, lo - 1.5 * (hi - lo + 1e-9)), hi + 0.25 * (hi - lo + 1e-9))
        ax.set_xticks(range(len(ppl)), [r["label"] for r in ppl], rotation=25, ha="right",
                      fontsize=8)
        ax.set_ylabel("perplexity of the sparse tail (lower is better)")
        ax.set_title(_title(rows, "perplexity: dense (grey), flat top-k (blue), others"),
                     fontsize=9)
        _save(fig, out / f"ppl_{tag}.png", made)
        plt.close(fig)
    nd = [r for r in rows if r.get("needle_total")]
    if nd:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(nd) + 2), 4.0))
        bars = ax.bar(range(len(nd)), [r["needle_acc"] for r in nd], color="#2ca02c")
        ax.bar_label(bars, labels=[f"{r['needle_hits']}/{r['needle_total']}" for r in nd],
                     fontsize=8, padding=1)
        ax.set_xticks(range(len(nd)), [r["label"] for r in nd], rotation=25, ha="right",
                      fontsize=8)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("questions answered")
        what = "passage questions answered" if _doc(first) == "rag" else "needles found"
        ax.set_title(_title(rows, what), fontsize=9)
        _save(fig, out / f"needles_{tag}.png", made)
        plt.close(fig)
    return made


def plot_contexts(rows, out: Path) -> list[Path]:
    """IoU and mass kept against the context for each scaled-budget setting and document."""
    plt = _plt()
    made = []
    by_doc = defaultdict(list)
    for r in rows:
        if (r["method"] not in ("dense", "flat") and r.get("iou_mean") is not None
                and r.get("budget", "scaled") == "scaled"):
            by_doc[(r["model"], r.get("indexer", "proxy"), _doc(r))].append(r)
    for (model, indexer, doc), rs in sorted(by_doc.items()):
        if len({r["context"] for r in rs}) < 2:
            continue
        for key, ylabel, fname in (("iou_mean", "IoU with flat top-k", "iou"),
                                   ("mass_kept", "attention mass kept / flat's", "mass")):
            series = defaultdict(list)
            for r in rs:
                series[series_label(r)].append((r["context"], r[key]))
            fig, ax = plt.subplots(figsize=(7, 4.5))
            ax.set_prop_cycle(color=plt.get_cmap("tab10").colors)
            for label, pts in sorted(series.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context L (tokens); k = L/16, m*B = L/4")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            ax.set_title(f"{model}, {indexer} indexer, {doc}: {ylabel} vs context", fontsize=9)
            _save(fig, out / f"{fname}_vs_context_{doc}.png", made)
            plt.close(fig)
    return made


def plot_all(rows, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for r in rows:
        groups[(_doc(r), r["context"], r.get("budget", "scaled"))].append(r)
    made = []
    for key in sorted(groups):
        made += plot_context(groups[key], out)
    return made + plot_contexts(rows, out)
