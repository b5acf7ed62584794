"""Result rows, one JSON object per line: the keys of :data:`ROW_KEYS` first (what ran, its
time and throughput, the GPU, torch, Triton, commit and command), then any extra keys."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROW_KEYS = ("op", "mode", "context", "queries", "batch", "next_n", "ms", "tflops", "gbps",
            "speedup_vs_flat", "gpu", "torch", "triton", "commit", "command")


def git_commit(default: str | None = None) -> str:
    if default:
        return default
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(commit: str | None = None) -> dict:
    """GPU name, library versions, commit and the command line that reproduces the run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(commit), "command": " ".join(["hisa"] + sys.argv[1:])
            if os.path.basename(sys.argv[0]) in ("hisa", "cli.py", "__main__.py") else " ".join(sys.argv)}


def make_row(env: dict, **fields) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(env)
    row.update(fields)
    return row


def append_rows(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
