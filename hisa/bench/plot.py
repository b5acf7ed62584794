"""Plots drawn from result rows (never by hand): time vs context, flat and HISA."""
from __future__ import annotations

from pathlib import Path


STYLES = {"flat": "o-", "hisa": "s-", "auto": "^--", "hisa3": "D-"}


def _series(row: dict) -> str:
    """Plot series of a row: its op, and the super-block setting for three levels."""
    if row["op"] == "hisa3":
        return f"hisa3 {row.get('super_size')}x{row.get('super_topk')}"
    return row["op"]


def _in_panel(row: dict, key, next_n) -> bool:
    if key is None:
        return True
    if row["mode"] == "prefill_chunk":
        return row.get("queries") == key
    return row.get("batch") == key and row.get("next_n") == next_n


def plot_rows(rows: list[dict], path: str | Path) -> Path | None:
    """One panel per mode (and batch for decode); log-log time vs context. None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # One panel per mode (prefill chunks: per chunk size; decode: per batch and next_n).
    panels = sorted({(r["mode"], r.get("batch") if r["mode"] == "decode" else
                      (r.get("queries") if r["mode"] == "prefill_chunk" else None),
                      r.get("next_n") if r["mode"] == "decode" else None) for r in rows},
                    key=str)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (mode, batch, next_n) in zip(axes[0], panels):
        series = sorted({_series(r) for r in rows if r["mode"] == mode
                         and _in_panel(r, batch, next_n)}, key=str)
        for label in series:
            pts = sorted((r["context"], r["ms"]) for r in rows if r["mode"] == mode
                         and _series(r) == label and _in_panel(r, batch, next_n))
            style = STYLES.get(label.split()[0], ".-")
            ax.plot(*zip(*pts), style, label=label)
        title = mode if batch is None else (f"chunk of {batch} queries" if mode ==
                                            "prefill_chunk" else
                                            f"{mode} batch {batch} next_n {next_n}")
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms", title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    gpu = rows[0].get("gpu", "?")
    fig.suptitle(f"hisa indexer, {gpu}, commit {rows[0].get('commit', '?')}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
